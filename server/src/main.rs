//! `trellis`: the server binary with the modules the cargo features selected.

fn main() -> std::process::ExitCode {
    trellis_server::cli::main()
}
