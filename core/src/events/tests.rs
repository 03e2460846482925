use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Noted {
    n: u32,
}

impl Event for Noted {
    const NAME: &'static str = "test.noted";
}

#[test]
fn handlers_are_routed_by_event_and_module_in_module_order() {
    let mut table = EventHandlerTable::default();
    table.add("a", |_: Published<Noted>| async { Ok(()) });
    table.add("b", |_: Published<Noted>| async { Ok(()) });
    let routes: Vec<_> = table.routes().iter().map(|r| (r.event, r.module)).collect();
    assert_eq!(routes, [("test.noted", "a"), ("test.noted", "b")]);
    assert!(table.route("test.noted", "b").is_some());
    assert!(table.route("test.other", "a").is_none());
}

#[tokio::test]
async fn a_handler_gets_the_stored_event_with_its_publication_facts() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let mut table = EventHandlerTable::default();
    table.add("a", move |event: Published<Noted>| {
        log.lock().expect("log").push((
            event.id().to_owned(),
            event.request_id().map(str::to_owned),
            event.attempt(),
            event.n,
        ));
        async { Ok(()) }
    });
    let stored = Stored {
        id: "p1".into(),
        event_id: "e1".into(),
        event: "test.noted".into(),
        listener: "a".into(),
        payload: r#"{"n":7}"#.into(),
        request_id: Some("r1".into()),
        traceparent: None,
        emitted_at_ms: 5,
        attempts: 2,
    };
    let route = table.route("test.noted", "a").expect("route");
    (route.run)(&stored).await.expect("handled");
    assert_eq!(
        *seen.lock().expect("log"),
        [("e1".to_owned(), Some("r1".to_owned()), 3, 7)]
    );
    let unreadable = Stored {
        payload: r#"{"n":"seven"}"#.into(),
        ..stored
    };
    let error = (route.run)(&unreadable).await.expect_err("cannot be read");
    assert!(error.to_string().contains("test.noted"), "{error}");
}

#[cfg(feature = "sqlite")]
mod relay {
    use super::*;
    use crate::{
        config::{DatabaseConfig, EventsConfig},
        storage::{Database, migrate},
    };

    struct Setup {
        db: Database,
        table: Option<EventHandlerTable>,
        _dir: tempfile::TempDir,
    }

    impl Setup {
        fn start(&mut self) {
            let table = self.table.take().expect("started once");
            self.db.events().start_relay(&self.db, &config(), table);
        }
    }

    fn config() -> EventsConfig {
        EventsConfig {
            poll_ms: 20,
            retry_backoff_ms: 10,
            retry_backoff_max_ms: 20,
            max_attempts: 3,
            lease_ms: 2_000,
            handler_timeout_ms: 1_000,
            ..EventsConfig::default()
        }
    }

    async fn setup(table: EventHandlerTable) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::connect(&DatabaseConfig {
            url: format!("sqlite://{}/events.db", dir.path().display()).into(),
            ..DatabaseConfig::default()
        })
        .await
        .expect("connects");
        migrate(&db, &[("core.events", MIGRATIONS)])
            .await
            .expect("migrates");
        db.events().wire(&table);
        Setup {
            db,
            table: Some(table),
            _dir: dir,
        }
    }

    fn counting(table: &mut EventHandlerTable, module: &'static str) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        table.add(module, move |_: Published<Noted>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        });
        count
    }

    async fn statuses(db: &Database) -> Vec<(String, String, i64)> {
        sqlx::query_as(
            "SELECT listener, status, attempts FROM trellis_event_publications ORDER BY listener",
        )
        .fetch_all(db.pool())
        .await
        .expect("reads")
    }

    async fn eventually<F: Fn() -> bool>(what: &str, done: F) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_committed_event_reaches_every_handler_and_a_rolled_back_one_none() {
        let mut table = EventHandlerTable::default();
        let a = counting(&mut table, "a");
        let b = counting(&mut table, "b");
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        let module = db.for_module("m");

        let rolled_back = module.begin().await.expect("begins");
        rolled_back.emit(&Noted { n: 1 }).await.expect("emits");
        drop(rolled_back);
        let tx = module.begin().await.expect("begins");
        tx.emit(&Noted { n: 2 }).await.expect("emits");
        tx.commit().await.expect("commits");
        assert_eq!(statuses(&db).await.len(), 2, "one publication per handler");

        setup.start();
        eventually("both handlers", || {
            a.load(Ordering::SeqCst) == 1 && b.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(db.events().stop_relay(Duration::from_secs(5)).await, 0);
        assert_eq!(
            statuses(&db).await,
            [
                ("a".to_owned(), "completed".to_owned(), 1),
                ("b".to_owned(), "completed".to_owned(), 1)
            ]
        );
        assert_eq!(
            a.load(Ordering::SeqCst),
            1,
            "the rolled-back event never ran"
        );
    }

    #[tokio::test]
    async fn a_failing_handler_is_retried_then_kept_as_failed_without_holding_back_the_others() {
        let mut table = EventHandlerTable::default();
        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        table.add("broken", move |_: Published<Noted>| {
            let attempt = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if attempt == 1 {
                    panic!("second attempt panics");
                }
                anyhow::bail!("the handler is broken")
            }
        });
        let fine = counting(&mut table, "fine");
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        db.for_module("m")
            .emit(&Noted { n: 1 })
            .await
            .expect("emits");

        setup.start();
        eventually("three attempts", || tries.load(Ordering::SeqCst) == 3).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        db.events().stop_relay(Duration::from_secs(5)).await;
        assert_eq!(tries.load(Ordering::SeqCst), 3, "no attempt after the last");
        assert_eq!(fine.load(Ordering::SeqCst), 1);
        let rows = statuses(&db).await;
        assert_eq!(
            rows,
            [
                ("broken".to_owned(), "failed".to_owned(), 3),
                ("fine".to_owned(), "completed".to_owned(), 1)
            ]
        );
        let (error,): (String,) = sqlx::query_as(
            "SELECT last_error FROM trellis_event_publications WHERE listener = 'broken'",
        )
        .fetch_one(db.pool())
        .await
        .expect("reads");
        assert_eq!(error, "the handler is broken");
    }

    #[tokio::test]
    async fn a_claim_whose_instance_died_is_taken_over_when_its_lease_runs_out() {
        let mut table = EventHandlerTable::default();
        let handled = counting(&mut table, "a");
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        db.for_module("m")
            .emit(&Noted { n: 1 })
            .await
            .expect("emits");
        let lease_end = crate::clock::now_millis() + 300;
        sqlx::query("UPDATE trellis_event_publications SET claimed_by = 'gone', due_at = $1")
            .bind(lease_end)
            .execute(db.pool())
            .await
            .expect("claims for a dead instance");

        setup.start();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(handled.load(Ordering::SeqCst), 0, "not while leased");
        eventually("the take-over", || handled.load(Ordering::SeqCst) == 1).await;
        db.events().stop_relay(Duration::from_secs(5)).await;
        assert_eq!(statuses(&db).await[0].1, "completed");
    }

    #[tokio::test]
    async fn stopping_waits_for_the_handlers_under_way() {
        let mut table = EventHandlerTable::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        table.add("slow", move |_: Published<Noted>| {
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        setup.start();
        db.for_module("m")
            .emit(&Noted { n: 1 })
            .await
            .expect("emits");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(db.events().stop_relay(Duration::from_secs(5)).await, 0);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(statuses(&db).await[0].1, "completed");
    }

    #[tokio::test]
    async fn completed_publications_are_purged_after_the_retention() {
        let mut table = EventHandlerTable::default();
        let handled = counting(&mut table, "a");
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        setup.start();
        let module = db.for_module("m");
        module.emit(&Noted { n: 1 }).await.expect("emits");
        eventually("the handler", || handled.load(Ordering::SeqCst) == 1).await;
        db.events().stop_relay(Duration::from_secs(5)).await;
        module.emit(&Noted { n: 2 }).await.expect("emits");

        let removed = purge(&db, crate::clock::now_millis() + 1)
            .await
            .expect("purges");
        assert_eq!(removed, 1, "only the completed one");
        assert_eq!(statuses(&db).await[0].1, "pending");
    }

    #[tokio::test]
    async fn a_failed_publication_is_listed_and_runs_again_once_resubmitted() {
        let mut table = EventHandlerTable::default();
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let handled = Arc::new(AtomicUsize::new(0));
        let (fault, done) = (broken.clone(), handled.clone());
        table.add("a", move |_: Published<Noted>| {
            let failing = fault.load(Ordering::SeqCst);
            if !failing {
                done.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                anyhow::ensure!(!failing, "the handler's dependency is down");
                Ok(())
            }
        });
        let mut setup = setup(table).await;
        let db = setup.db.clone();
        let registry = Registry::new(db.clone());
        setup.start();
        db.for_module("m")
            .emit(&Noted { n: 1 })
            .await
            .expect("emits");
        let failed = loop {
            let failed = registry
                .list(Some(PublicationStatus::Failed), None, 10)
                .await
                .expect("lists");
            if !failed.is_empty() {
                break failed;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(failed.len(), 1);
        let publication = &failed[0];
        assert_eq!(
            (publication.event.as_str(), publication.module.as_str()),
            ("test.noted", "a")
        );
        assert_eq!(publication.attempts, 3);
        assert_eq!(
            publication.last_error.as_deref(),
            Some("the handler's dependency is down")
        );
        assert_eq!(publication.payload, r#"{"n":1}"#);

        broken.store(false, Ordering::SeqCst);
        assert_eq!(
            registry.resubmit(&publication.id).await.expect("resubmits"),
            Resubmitted::Yes
        );
        eventually("the resubmitted run", || {
            handled.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            registry.resubmit(&publication.id).await.expect("answers"),
            Resubmitted::NotFailed(PublicationStatus::Completed)
        );
        assert_eq!(
            registry.resubmit("no-such-id").await.expect("answers"),
            Resubmitted::NotFound
        );
        assert_eq!(registry.resubmit_failed().await.expect("answers"), 0);
        db.events().stop_relay(Duration::from_secs(5)).await;
    }
}
