//! `boxwood`: the server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use boxwood::app::App;
use boxwood::config::{Config, Overrides};
use boxwood::remote::Remote;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "boxwood", version, about = "Self-hosted microVM sandboxes speaking the Contree API")]
struct Cli {
    /// Log lines on stderr: `text`, or `json` (one object per line, with the operation id of
    /// a run's lines in its span).
    #[arg(long, global = true, env = "BOXWOOD_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Serve the MCP tools (run, upload, inspect, tags, operations) on stdin/stdout, for an
    /// agent whose MCP configuration starts `boxwood mcp`.
    Mcp {
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a command in a fresh microVM on a server, streaming its output; exits with its
    /// exit code. Example: boxwood run -i python:3.11 -- python -c 'print(1)'
    Run {
        #[command(flatten)]
        args: boxwood::remote::RunArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run another command in a running instance, streaming it; exits with its code.
    Exec {
        operation: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a run's output (`-f`: and follow it until it ends).
    Logs {
        operation: String,
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a directory of an image, without a VM.
    Ls {
        image: String,
        #[arg(default_value = "/")]
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a file of an image, without a VM.
    Cat {
        image: String,
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Upload a file for a run's `files`; prints its UUID and SHA-256.
    Upload {
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a server's images (`--tree`: as their lineage).
    Images {
        #[arg(long)]
        tree: bool,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        remote: Remote,
    },
    /// List a server's operations, newest first.
    Ps {
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel an operation.
    Cancel {
        operation: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Move TAG to IMAGE (a UUID or tag:NAME).
    Tag {
        image: String,
        tag: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Save a server's URL and token (0600) for the other client commands.
    Login {
        url: String,
        #[arg(long)]
        token: String,
    },
    /// Print the SHA-256 to put in a `[[tokens]]` entry instead of the secret.
    HashToken { secret: String },
    /// Run one pass of the retention policy ([core.retention]) on the running server now.
    Gc {
        /// List what the pass would remove first, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the server's JSON report.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Show what each namespace keeps on the running server (images, uploads, event logs).
    Usage {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Manage API tokens kept in the server's database (only their hashes are stored).
    Token {
        #[command(subcommand)]
        action: TokenAction,
        /// TOML configuration file (for its state_dir).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// State directory (overrides config and BOXWOOD_STATE_DIR).
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
    },
}

/// `-o json` on the listings.
#[derive(clap::Args)]
struct Output {
    /// `text` (default) or `json`.
    #[arg(short = 'o', long = "output", default_value = "text")]
    format: OutputFormat,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

impl Output {
    fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }
}

/// Where a command finds the server's state dir.
#[derive(clap::Args)]
struct StateArgs {
    /// TOML configuration file (for its state_dir).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// State directory (overrides config and BOXWOOD_STATE_DIR).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl StateArgs {
    fn load(self) -> anyhow::Result<Config> {
        let flags = Overrides { state_dir: self.state_dir, ..Overrides::default() };
        Config::load(self.config.as_deref(), Overrides::from_env()?, flags)
    }
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token and print its secret (shown only this once).
    Create {
        /// Namespace the token's images, files and operations belong to.
        #[arg(long)]
        namespace: String,
        /// Comma-separated: list, spawn, spawn_disposable, import, cancel, set_image_tag, or all.
        #[arg(long, value_delimiter = ',', default_value = "all")]
        permissions: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by its UUID; it stops working at once.
    Revoke { uuid: uuid::Uuid },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First: the database, blobs, layers, guest assets and every QEMU's files are private.
    boxwood::state::set_private_umask();
    let cli = Cli::parse();
    // `boxwood mcp` speaks on stdout; its stderr reaches the agent's logs, so only warnings.
    let quiet = !matches!(
        cli.command,
        Command::Serve { .. } | Command::Gc { .. } | Command::Usage { .. } | Command::Token { .. }
    );
    let default_level = if quiet { "warn" } else { "info" };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    match cli.command {
        Command::Mcp { remote } => boxwood_mcp::serve_stdio(remote.client()?).await.map_err(anyhow::Error::msg),
        Command::Run { args, remote } => {
            let code = boxwood::remote::run(&remote.client()?, &args).await?;
            std::process::exit(code)
        }
        Command::Exec { operation, command, remote } => {
            let code = boxwood::remote::exec(&remote.client()?, &operation, &command).await?;
            std::process::exit(code)
        }
        Command::Logs { operation, follow, remote } => {
            boxwood::remote::logs(&remote.client()?, &operation, follow).await
        }
        Command::Ls { image, path, remote } => boxwood::remote::ls(&remote.client()?, &image, &path).await,
        Command::Cat { image, path, remote } => boxwood::remote::cat(&remote.client()?, &image, &path).await,
        Command::Upload { file, remote } => boxwood::remote::upload(&remote.client()?, &file).await,
        Command::Images { tree, out, remote } => boxwood::remote::images(&remote.client()?, tree, out.json()).await,
        Command::Ps { out, remote } => boxwood::remote::ps(&remote.client()?, out.json()).await,
        Command::Cancel { operation, remote } => {
            remote.client()?.cancel(&operation).await?;
            println!("cancelled {operation}");
            Ok(())
        }
        Command::Tag { image, tag, remote } => boxwood::remote::tag(&remote.client()?, &image, &tag).await,
        Command::Login { url, token } => {
            let path = boxwood::remote::login(&url, &token).await?;
            println!("saved to {}", path.display());
            Ok(())
        }
        Command::HashToken { secret } => {
            println!("{}", boxwood_core::auth::sha256_hex(&secret));
            Ok(())
        }
        Command::Token { action, config, state_dir } => {
            let flags = Overrides { state_dir, ..Overrides::default() };
            let cfg = Config::load(config.as_deref(), Overrides::from_env()?, flags)?;
            token_command(action, &cfg).await
        }
        Command::Gc { dry_run, json, state } => {
            let cfg = state.load()?;
            let target = if dry_run { "/gc?dry_run=true" } else { "/gc" };
            let report = boxwood::admin::request(&cfg.state_dir, "POST", target).await?;
            if json {
                println!("{report:#}")
            } else {
                boxwood::admin::print_gc(&report)
            }
            Ok(())
        }
        Command::Usage { json, state } => {
            let cfg = state.load()?;
            let rows = boxwood::admin::request(&cfg.state_dir, "GET", "/usage").await?;
            if json {
                println!("{rows:#}")
            } else {
                boxwood::admin::print_usage(&rows)
            }
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

async fn token_command(action: TokenAction, cfg: &Config) -> anyhow::Result<()> {
    let store = boxwood::app::open_store(&cfg.state_dir).await?;
    match action {
        TokenAction::Create { namespace, permissions, description } => {
            let perms = boxwood_core::auth::parse_permissions(&permissions)?;
            let (secret, record) =
                boxwood_core::auth::create_token(store.as_ref(), &namespace, &perms, description).await?;
            println!("token {} in namespace {} with {}", record.uuid, record.namespace, record.permissions.join(","));
            println!("BOXWOOD_TOKEN={secret}");
        }
        TokenAction::List => {
            for t in boxwood_store::Store::list_tokens(store.as_ref()).await? {
                let state = if t.revoked_at_us.is_some() { "revoked" } else { "active" };
                let desc = t.description.unwrap_or_default();
                println!("{}  {state:7}  {:12}  {}  {desc}", t.uuid, t.namespace, t.permissions.join(","));
            }
        }
        TokenAction::Revoke { uuid } => {
            if !boxwood_store::Store::revoke_token(store.as_ref(), uuid, boxwood_core::clock::now_us()).await? {
                anyhow::bail!("no active token {uuid}");
            }
            println!("revoked {uuid}");
        }
    }
    Ok(())
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
