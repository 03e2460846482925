//! The `trellis` command line: runs the server, checks the configuration, or prints the
//! OpenAPI document. Serving is: arguments -> configuration -> telemetry -> build -> run.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use crate::{Application, ShutdownIncomplete};
use clap::{Parser, Subcommand};
use trellis_core::config::ConfigSources;

/// Trellis: a modular HTTP API server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// An extra configuration file, applied after config/default.toml and the profile file.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print the OpenAPI document of the compiled-in modules and exit.
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
    /// Load and check the configuration, print it, and exit.
    CheckConfig,
}

/// Parses the arguments and runs the command; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Openapi { yaml } => {
            let doc = if yaml {
                crate::openapi_yaml()
            } else {
                crate::openapi_json()
            };
            println!("{doc}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match ConfigSources::from_env(cli.config).load() {
            Ok(loaded) => {
                // Secrets print redacted: this output ends up in terminals, CI logs and
                // support tickets.
                println!("{:#?}", loaded.config.redacted());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("trellis: {error}");
                ExitCode::from(2)
            }
        },
        Command::Serve => serve(cli.config),
    }
}

fn serve(file: Option<PathBuf>) -> ExitCode {
    let sources = ConfigSources::from_env(file);
    let loaded = match sources.load() {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("trellis: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("trellis: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let flush_budget = Duration::from_millis(
            (loaded.config.tracing.export_timeout_ms).min(loaded.config.server.shutdown_timeout_ms),
        );
        let telemetry =
            match trellis_core::telemetry::init(&loaded.config.telemetry, &loaded.config.tracing) {
                Ok(telemetry) => Arc::new(telemetry),
                Err(error) => {
                    eprintln!("trellis: {error:#}");
                    return ExitCode::from(2);
                }
            };
        let watcher = telemetry
            .clone()
            .watch_level(sources, Duration::from_secs(1));
        let result = match Application::build(loaded).await {
            Ok(app) => app.run_until_stopped().await,
            Err(error) => Err(error),
        };
        watcher.abort();
        telemetry.flush_traces(flush_budget);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) if error.is::<ShutdownIncomplete>() => {
                tracing::error!(error = %error, "trellis stopped with work left undone");
                eprintln!("trellis: {error}");
                ExitCode::from(3)
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "trellis failed");
                eprintln!("trellis: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}
