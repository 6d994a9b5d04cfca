//! The sandbox init as a stand-alone binary (for this crate's tests; the node binary has the
//! same init as its hidden `flotilla sandbox-init` subcommand). See
//! [`flotilla_worker::sandbox_init`].

fn main() {
    flotilla_worker::sandbox_init::main()
}
