//! `tern jsonrpc`: the daemon's JSON-RPC on stdin and stdout, for a
//! program that spawns tern and talks to it through pipes.

use std::io::BufWriter;

use super::daemon::Daemon;
use super::Cli;

/// Serve the daemon's JSON-RPC 2.0 on stdin and stdout, for programs that
/// spawn tern
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  printf '%s\\n' '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"contacts\"}' | tern jsonrpc --home ~/bot\n\nOne JSON-RPC object per line on stdin; responses and notifications one per\nline on stdout; notes on stderr. Ends when stdin does. Like `tern daemon`,\nit is refused for a home a daemon serves. Methods: docs/JSONRPC.md."
)]
pub struct Args {
    /// Keep each received message pending until it is acknowledged with
    /// `ack`
    #[arg(long)]
    pub manual_ack: bool,
    #[command(flatten)]
    pub files: super::daemon::files::FileArgs,
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let homes = super::unlock::homes(cli)?;
    let (daemon, _locks) = Daemon::start(cli, homes, args.manual_ack, "-", &args.files)?;
    let conn = daemon.stdio_conn(Box::new(BufWriter::new(std::io::stdout())));
    daemon.serve(std::io::stdin(), conn);
    Ok(())
}
