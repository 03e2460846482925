//! `trellis`: the server binary with the modules the cargo features selected.

// mimalloc: glibc's allocator spent about 45% of the CPU of a BI ingest load in malloc and
// free and kept hundreds of MiB of fragmented arenas after it (tests/bench/RESULTS.md).
// Built without transparent huge pages, which doubled the idle RSS (31 -> 50 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    trellis_server::cli::main()
}
