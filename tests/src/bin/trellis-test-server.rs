//! The `trellis` server plus the `probe` fixture module, for process-level tests
//! (signals, configuration from the environment, log level reload).

use trellis_tests as _;

fn main() -> std::process::ExitCode {
    trellis_server::cli::main()
}
