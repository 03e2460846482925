//! Trellis's project tasks.
//!
//! - `cargo xtask new-module NAME`: writes `modules/NAME` from the template (a module with
//!   one sample resource, its migration, unit tests and an integration test on the test
//!   kit) and links it in: the workspace member and dependency, the server's feature and
//!   optional dependency, and the link line in `server/src/modules.rs`. Nothing else needs
//!   editing: the tests read the module list from the registry.
//! - `cargo xtask remove-module NAME`: the reverse, for a module made by `new-module`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// The template, as `(path in the new crate, text)`.
const TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../template/Cargo.toml.tmpl")),
    (
        "migrations/0001_create_items.sql",
        include_str!("../template/migrations/0001_create_items.sql"),
    ),
    ("src/lib.rs", include_str!("../template/src/lib.rs")),
    ("src/api.rs", include_str!("../template/src/api.rs")),
    ("src/app.rs", include_str!("../template/src/app.rs")),
    ("src/domain.rs", include_str!("../template/src/domain.rs")),
    ("src/error.rs", include_str!("../template/src/error.rs")),
    ("src/repo.rs", include_str!("../template/src/repo.rs")),
    ("tests/api.rs", include_str!("../template/tests/api.rs")),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["new-module", name] => new_module(&root, name),
        ["remove-module", name] => remove_module(&root, name),
        _ => Err("usage: cargo xtask new-module NAME | cargo xtask remove-module NAME".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// A module name: a lowercase letter, then lowercase letters, digits or `_` (it names the
/// crate, the feature, the config section and the tables).
fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 32
        && !name.ends_with('_');
    match valid {
        true => Ok(()),
        false => Err(format!(
            "`{name}`: a module name is a lowercase letter followed by lowercase letters, \
             digits or `_`, at most 32 characters"
        )),
    }
}

/// `shop_items` -> `ShopItems`.
fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn render(text: &str, name: &str) -> String {
    text.replace("{{name}}", name)
        .replace("{{Name}}", &camel(name))
}

/// The lines `new-module` adds outside the crate, by file.
struct Links {
    member: String,
    dependency: String,
    feature: String,
    server_dependency: String,
    link: String,
}

impl Links {
    fn of(name: &str) -> Self {
        Self {
            member: format!("\"modules/{name}\""),
            dependency: format!(
                "trellis-{name} = {{ path = \"modules/{name}\", version = \"0.1.0\" }}"
            ),
            feature: format!("{name} = [\"dep:trellis-{name}\"]"),
            server_dependency: format!("trellis-{name} = {{ workspace = true, optional = true }}"),
            link: format!("#[cfg(feature = \"{name}\")]\nuse trellis_{name} as _;\n"),
        }
    }
}

fn new_module(root: &Path, name: &str) -> Result<(), String> {
    check_name(name)?;
    let dir = root.join("modules").join(name);
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    let links = Links::of(name);
    let workspace = read(&root.join("Cargo.toml"))?;
    if workspace.contains(&links.member) {
        return Err(format!("the workspace already names modules/{name}"));
    }
    let workspace = add_member(&workspace, "members = [", &links.member)?;
    let workspace = add_member(&workspace, "default-members = [", &links.member)?;
    let workspace = insert_after_last(&workspace, &links.dependency, |line| {
        line.starts_with("trellis-") && line.contains("path = \"modules/")
    })?;
    let server = read(&root.join("server/Cargo.toml"))?;
    let server = insert_after_last(&server, &links.feature, |line| {
        line.split_once(" = [\"dep:trellis-").is_some()
    })?;
    let server = insert_after_last(&server, &links.server_dependency, |line| {
        line.starts_with("trellis-") && line.ends_with("{ workspace = true, optional = true }")
    })?;
    let modules = add_link(
        &read(&root.join("server/src/modules.rs"))?,
        name,
        &links.link,
    );

    for (path, text) in TEMPLATE {
        write(&dir.join(path), &render(text, name))?;
    }
    write(&root.join("Cargo.toml"), &workspace)?;
    write(&root.join("server/Cargo.toml"), &server)?;
    write(&root.join("server/src/modules.rs"), &modules)?;
    // The template's line breaks depend on the name's length.
    let formatted = std::process::Command::new(env!("CARGO"))
        .args(["fmt", "-p", &format!("trellis-{name}")])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cargo fmt: {e}"))?;
    if !formatted.success() {
        return Err(format!("cargo fmt -p trellis-{name} failed"));
    }
    println!(
        "created modules/{name} and linked it behind the server's `{name}` feature.\n\
         next:\n  cargo test -p trellis-{name}\n  \
         cargo run -p trellis-server --features {name}\n\
         then add `{name}` to the server's default features if every build should have it,\n\
         and refresh that build's OpenAPI snapshot:\n  \
         UPDATE_OPENAPI_SNAPSHOT=1 cargo test -p trellis-server --test openapi_snapshot"
    );
    Ok(())
}

fn remove_module(root: &Path, name: &str) -> Result<(), String> {
    check_name(name)?;
    let dir = root.join("modules").join(name);
    let links = Links::of(name);
    let workspace = read(&root.join("Cargo.toml"))?;
    let workspace = remove_member(&workspace, "members = [", &links.member)?;
    let workspace = remove_member(&workspace, "default-members = [", &links.member)?;
    let workspace = remove_line(&workspace, &links.dependency)?;
    let server = read(&root.join("server/Cargo.toml"))?;
    let server = remove_line(
        &remove_line(&server, &links.feature)?,
        &links.server_dependency,
    )?;
    let modules = read(&root.join("server/src/modules.rs"))?;
    if !modules.contains(&links.link) {
        return Err(format!(
            "server/src/modules.rs has no link line for `{name}`"
        ));
    }
    let modules = modules.replacen(&links.link, "", 1);
    write(&root.join("Cargo.toml"), &workspace)?;
    write(&root.join("server/Cargo.toml"), &server)?;
    write(&root.join("server/src/modules.rs"), &modules)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    println!("removed modules/{name} and its links");
    Ok(())
}

/// Inserts the link lines where rustfmt keeps them: the `use` lines sorted by crate.
fn add_link(modules: &str, name: &str, link: &str) -> String {
    let crate_name = format!("trellis_{name}");
    let before = modules
        .match_indices("#[cfg(feature = ")
        .map(|(at, _)| at)
        .find(|&at| {
            modules[at..]
                .lines()
                .nth(1)
                .and_then(|line| line.strip_prefix("use "))
                .is_some_and(|used| used.split(' ').next() > Some(crate_name.as_str()))
        });
    match before {
        Some(at) => format!("{}{link}{}", &modules[..at], &modules[at..]),
        None => format!("{modules}{link}"),
    }
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &PathBuf, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The items of the one-line list starting with `prefix` (`members = [`), and its index.
fn list_items(text: &str, prefix: &str) -> Result<(usize, Vec<String>), String> {
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, line)| line.starts_with(prefix))
        .ok_or_else(|| format!("Cargo.toml has no `{prefix}` line"))?;
    let inner = line[prefix.len()..]
        .strip_suffix(']')
        .ok_or_else(|| format!("Cargo.toml: `{prefix}` must be one line"))?;
    Ok((index, inner.split(", ").map(str::to_owned).collect()))
}

fn replace_line(text: &str, index: usize, new: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines[index] = new;
    lines.join("\n") + "\n"
}

/// Adds `member` after the last `"modules/..."` item of the list.
fn add_member(text: &str, prefix: &str, member: &str) -> Result<String, String> {
    let (index, mut items) = list_items(text, prefix)?;
    let last = items
        .iter()
        .rposition(|item| item.starts_with("\"modules/"))
        .ok_or_else(|| format!("Cargo.toml: `{prefix}` lists no module"))?;
    items.insert(last + 1, member.to_owned());
    Ok(replace_line(
        text,
        index,
        &format!("{prefix}{}]", items.join(", ")),
    ))
}

fn remove_member(text: &str, prefix: &str, member: &str) -> Result<String, String> {
    let (index, mut items) = list_items(text, prefix)?;
    let before = items.len();
    items.retain(|item| item != member);
    if items.len() == before {
        return Err(format!("Cargo.toml: `{prefix}` does not list {member}"));
    }
    Ok(replace_line(
        text,
        index,
        &format!("{prefix}{}]", items.join(", ")),
    ))
}

/// Inserts `new` after the last line `anchor` accepts.
fn insert_after_last(
    text: &str,
    new: &str,
    anchor: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines
        .iter()
        .rposition(|line| anchor(line))
        .ok_or_else(|| format!("no line to add `{new}` after"))?;
    lines.insert(last + 1, new);
    Ok(lines.join("\n") + "\n")
}

fn remove_line(text: &str, line: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let index = lines
        .iter()
        .position(|l| *l == line)
        .ok_or_else(|| format!("no line `{line}` to remove"))?;
    let mut lines = lines;
    lines.remove(index);
    Ok(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_camel_cased() {
        assert!(check_name("notes").is_ok());
        assert!(check_name("shop_items2").is_ok());
        for bad in ["", "Notes", "2notes", "no-tes", "notes_", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(camel("shop_items"), "ShopItems");
        assert_eq!(
            render("{{Name}}Module for {{name}}", "shop_items"),
            "ShopItemsModule for shop_items"
        );
    }

    #[test]
    fn links_are_added_and_removed_exactly() {
        let workspace = "[workspace]\nmembers = [\"core\", \"modules/bi\", \"tests\"]\n\
                         default-members = [\"modules/bi\", \"tests\"]\n\n\
                         [workspace.dependencies]\n\
                         trellis-bi = { path = \"modules/bi\", version = \"0.1.0\" }\n\
                         trellis-server = { path = \"server\" }\n";
        let links = Links::of("notes");
        let added = add_member(workspace, "members = [", &links.member).expect("members");
        let added = add_member(&added, "default-members = [", &links.member).expect("default");
        let added = insert_after_last(&added, &links.dependency, |l| {
            l.starts_with("trellis-") && l.contains("path = \"modules/")
        })
        .expect("dependency");
        assert!(
            added.contains("members = [\"core\", \"modules/bi\", \"modules/notes\", \"tests\"]")
        );
        assert!(added.contains(
            "trellis-bi = { path = \"modules/bi\", version = \"0.1.0\" }\n\
             trellis-notes = { path = \"modules/notes\", version = \"0.1.0\" }\n"
        ));
        let removed = remove_member(&added, "members = [", &links.member).expect("members");
        let removed =
            remove_member(&removed, "default-members = [", &links.member).expect("default");
        let removed = remove_line(&removed, &links.dependency).expect("dependency");
        assert_eq!(removed, workspace);
    }

    #[test]
    fn the_link_line_goes_where_rustfmt_sorts_it() {
        let modules = "//! Links.\n\n#[cfg(feature = \"bi\")]\nuse trellis_bi as _;\n\
                       #[cfg(feature = \"user\")]\nuse trellis_user as _;\n";
        let linked = add_link(modules, "notes", &Links::of("notes").link);
        assert!(linked.ends_with(
            "use trellis_bi as _;\n#[cfg(feature = \"notes\")]\nuse trellis_notes as _;\n\
             #[cfg(feature = \"user\")]\nuse trellis_user as _;\n"
        ));
        let last = add_link(modules, "zoo", &Links::of("zoo").link);
        assert!(last.ends_with("use trellis_zoo as _;\n"));
    }
}
