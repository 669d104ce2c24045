//! Composition root: opens the stores, prepares the guest, starts the VM runtime and the core
//! service, seeds the built-in image, and serves the HTTP API until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use boxwood_blob::FsBlobStore;
use boxwood_core::auth::{PUBLIC_NAMESPACE, Permission, TokenConfig};
use boxwood_core::clock::now_us;
use boxwood_core::spec::DEFAULT_PATH;
use boxwood_core::{Backends, Service};
use boxwood_image::{FsLayerStore, LayerStore, build_busybox_tree};
use boxwood_store::{ImageRecord, SqliteStore};
use boxwood_vm::{QemuRuntime, VmConfig, VmRuntime, prepare_guest_assets, reap_stale};
use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;
use crate::network::{Egress, NetworkGate, start_egress};

/// The tag of the built-in base image, in the public namespace.
pub const BASE_IMAGE_TAG: &str = "busybox:latest";

/// A started server, bound but not yet serving.
pub struct App {
    service: Service,
    listener: TcpListener,
    /// The bootstrap token, when the server made one (no tokens configured).
    pub bootstrap_token: Option<String>,
    /// The accelerator the VM runtime uses.
    pub accel: String,
    /// The guest egress filter; removed after the last run has stopped.
    egress: Egress,
    /// Closed last, so the database is checkpointed and its `-wal` settled when `serve` returns.
    db: Arc<SqliteStore>,
    http: boxwood_api::HttpConfig,
    mcp: crate::config::McpConfig,
    /// The operator's socket (`boxwood gc`, `boxwood usage`) and its path.
    admin: (UnixListener, PathBuf),
}

impl App {
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        // First, so the start-up's own work (the template, the first sweep) is counted.
        boxwood_api::install_metrics();
        let state = config.state_dir.clone();
        crate::state::prepare(&state)?;
        let bootstrap_token = if config.tokens.is_empty() {
            let token = bootstrap_token(&state.join("bootstrap-token"))?;
            config.tokens.push(TokenConfig {
                token: Some(token.clone()),
                sha256: None,
                namespace: "default".into(),
                permissions: Permission::ALL.into_iter().collect(),
            });
            Some(token)
        } else {
            None
        };

        let store = open_db(&state).await?;
        let layers = Arc::new(FsLayerStore::open(&state.join("images")).context("opening the image store")?);
        let blobs = Arc::new(FsBlobStore::open(&state.join("blobs")).context("opening the blob store")?);
        let agent = config.agent_path()?;
        let guest_dir = state.join("guest");
        let release = config.kernel_release.clone();
        let assets = tokio::task::spawn_blocking(move || prepare_guest_assets(&agent, &guest_dir, release.as_deref()))
            .await?
            .context("preparing the guest kernel and initramfs")?;
        let run_dir = state.join("run");
        let reaped = reap_stale(&run_dir).context("cleaning up VMs of a previous run")?;
        if !reaped.is_empty() {
            tracing::warn!(count = reaped.len(), "removed leftovers of VMs from a previous server process");
        }
        let vm = VmConfig { usual_upper_bytes: Some(config.core.limits.max_layer_bytes), ..config.vm.clone() };
        let runtime = QemuRuntime::new(vm, assets, run_dir).await.context("starting the VM runtime")?;
        let accel = runtime.accel().to_owned();
        // The uid block every QEMU of this server runs under (none when the jail is off); the
        // filter matches the sockets of exactly those uids. Runs take VMs only after it is in.
        let guest_uids = runtime.jail_uid_range();
        let runtime = Arc::new(runtime);
        let egress = tokio::task::spawn_blocking({
            let (network, runtime) = (config.network.clone(), runtime.clone());
            move || start_egress(&network, guest_uids, |base| runtime.hold_stale_uid_block(base))
        })
        .await?;
        let runtime = NetworkGate::new(runtime, &egress);
        let importer = Arc::new(boxwood_oci::Importer::new(config.registry.clone(), state.join("imports")));
        let db = store.clone();
        let backends = Backends { store, blobs, layers: layers.clone(), runtime: Arc::new(runtime), importer };
        let service = Service::start(config.core.clone(), &config.tokens, backends).await?;
        seed_base_image(&service, layers.as_ref(), &config.busybox).await?;
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let admin = bind_admin(&state.join(boxwood_api::ADMIN_SOCKET))?;
        Ok(Self {
            service,
            listener,
            bootstrap_token,
            accel,
            egress,
            db,
            http: config.http.clone(),
            mcp: config.mcp.clone(),
            admin,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Serves until `shutdown` resolves; then stops every run (each ends with its completion
    /// written and its VM gone) and lets requests in flight finish, within the shutdown
    /// grace (`[http]`), before the last connections close.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let service = self.service.clone();
        let (admin_listener, admin_path) = self.admin;
        let admin_stop = tokio_util::sync::CancellationToken::new();
        let admin = axum::serve(admin_listener, boxwood_api::admin_router(self.service.clone()))
            .with_graceful_shutdown(admin_stop.clone().cancelled_owned());
        let admin = tokio::spawn(async move {
            if let Err(e) = admin.await {
                tracing::warn!(error = %e, "the admin socket stopped serving");
            }
        });
        let own_url = loopback_url(self.listener.local_addr()?);
        let router = boxwood_api::router(self.service.clone())
            .nest_service("/mcp", mcp_service(self.service, own_url, &self.mcp)?);
        boxwood_api::serve(self.listener, router, &self.http, shutdown, async move { service.shutdown().await }).await;
        admin_stop.cancel();
        if tokio::time::timeout(std::time::Duration::from_secs(2), admin).await.is_err() {
            tracing::warn!("an admin request outlived the shutdown");
        }
        let _ = std::fs::remove_file(&admin_path);
        drop(self.egress);
        // A task the grace cut short may still hold a connection; the WAL is safe either way.
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.db.close()).await.is_err() {
            tracing::warn!("the database did not close in time");
        }
        Ok(())
    }
}

/// The URL this server answers itself on (a wildcard listen address is reached on loopback).
fn loopback_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// `/mcp`: the MCP tools over streamable HTTP. A request is authenticated like any API call
/// (401/403 in the API's envelope otherwise); its tools then call this server's API back on
/// loopback with the caller's own token, so they see exactly what the caller may.
fn mcp_service(
    service: boxwood_core::Service,
    own_url: String,
    config: &crate::config::McpConfig,
) -> anyhow::Result<axum::Router> {
    use axum::extract::{Request, State};
    use axum::middleware::Next;
    use axum::response::IntoResponse as _;
    let fallback = boxwood_client::Client::new(&own_url, "").context("the server's own URL")?;
    let tools = boxwood_mcp::http_service(fallback, config.allowed_hosts.clone(), config.host_files);
    async fn authenticate(
        State((service, url)): State<(boxwood_core::Service, String)>,
        mut req: Request,
        next: Next,
    ) -> axum::response::Response {
        let token = boxwood_api::bearer_token(req.headers()).map(str::to_owned);
        if let Err(e) = service.authenticate(token.as_deref()).await {
            return boxwood_api::ApiError::from(e).into_response();
        }
        match boxwood_client::Client::new(&url, token.as_deref().unwrap_or_default()) {
            Ok(client) => {
                req.extensions_mut().insert(client);
                next.run(req).await
            }
            // It came in a header, so it goes back out in one; kept total anyway.
            Err(_) => boxwood_api::ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unusable bearer token")
                .into_response(),
        }
    }
    Ok(axum::Router::new()
        .fallback_service(tools)
        .layer(axum::middleware::from_fn_with_state((service, own_url), authenticate)))
}

/// Opens (creating or migrating) the metadata database under the state dir, which it makes
/// private first (see [`crate::state::prepare`]); SQLite gives `-wal` and `-shm` the
/// database's own mode.
pub async fn open_store(state_dir: &Path) -> anyhow::Result<Arc<SqliteStore>> {
    crate::state::prepare(state_dir)?;
    open_db(state_dir).await
}

async fn open_db(state_dir: &Path) -> anyhow::Result<Arc<SqliteStore>> {
    Ok(Arc::new(SqliteStore::open(&state_dir.join("boxwood.db")).await.context("opening the database")?))
}

/// Binds the operator's socket, replacing one a previous process left (the state dir is
/// this server's alone: its stores are locked by now). Owner-only, inside a 0700 dir.
fn bind_admin(path: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(m.file_type().is_socket(), "{} exists and is not a socket", path.display());
        std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    Ok((listener, path.to_owned()))
}

/// Reads the bootstrap token, creating it (0600) on first start.
fn bootstrap_token(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let t = existing.trim();
        if !t.is_empty() {
            return Ok(t.to_owned());
        }
    }
    let token = hex::encode(rand::random::<[u8; 24]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

/// Makes sure the public `busybox:latest` image exists, building it from the host's static
/// busybox on first start.
async fn seed_base_image(service: &Service, layers: &dyn LayerStore, busybox: &Path) -> anyhow::Result<()> {
    if service.has_tag(PUBLIC_NAMESPACE, BASE_IMAGE_TAG).await? {
        return Ok(());
    }
    let tree = layers.staging_dir()?;
    let bb = busybox.to_owned();
    let t = tree.clone();
    tokio::task::spawn_blocking(move || build_busybox_tree(&bb, &t))
        .await?
        .with_context(|| format!("building the base image from {}", busybox.display()))?;
    let layer = layers.commit_tree(tree).await.context("publishing the base image layer")?;
    let image = ImageRecord {
        uuid: uuid::Uuid::new_v4(),
        namespace: PUBLIC_NAMESPACE.into(),
        parent_uuid: None,
        operation_uuid: None,
        layers: vec![layer.digest.clone()],
        env: BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]),
        workdir: None,
        size_bytes: layer.content_bytes as i64,
        created_at_us: now_us(),
    };
    let uuid = service.ensure_tagged_image(PUBLIC_NAMESPACE, BASE_IMAGE_TAG, image).await?;
    tracing::info!(%uuid, digest = %layer.digest, "seeded the base image {BASE_IMAGE_TAG}");
    Ok(())
}
