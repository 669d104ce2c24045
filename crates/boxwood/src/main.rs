//! `boxwood`: the server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use boxwood::app::App;
use boxwood::config::{Config, Overrides};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "boxwood", version, about = "Self-hosted microVM sandboxes speaking the Contree API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address (overrides config and BOXWOOD_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// State directory (overrides config and BOXWOOD_STATE_DIR).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// VM accelerator: auto, kvm or tcg (overrides config and BOXWOOD_ACCEL).
        #[arg(long)]
        accel: Option<String>,
        /// Guest agent binary (overrides config and BOXWOOD_AGENT_BIN).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Print the SHA-256 to put in a `[[tokens]]` entry instead of the secret.
    HashToken { secret: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::HashToken { secret } => {
            println!("{}", boxwood_core::auth::sha256_hex(&secret));
            Ok(())
        }
        Command::Serve { config, listen, state_dir, accel, agent } => {
            let flags = Overrides { listen, state_dir, accel, agent_binary: agent };
            let cfg = Config::load(config.as_deref(), Overrides::from_env()?, flags)?;
            let app = App::start(cfg).await?;
            let addr = app.local_addr().context("reading the bound address")?;
            println!("Boxwood is serving the Contree API v1 on http://{addr} (VMs: {})", app.accel);
            println!("BOXWOOD_URL=http://{addr}");
            match &app.bootstrap_token {
                Some(t) => println!("BOXWOOD_TOKEN={t}"),
                None => println!("BOXWOOD_TOKEN=(one of the tokens in the configuration)"),
            }
            app.serve(shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
