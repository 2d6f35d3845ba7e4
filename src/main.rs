//! The `thinsnap` command: `serve` (the daemon), `status`, `ls` and `pool grow` (ask the daemon),
//! `pool destroy`. The composition root: it parses the command line and wires the real pool,
//! store and engine into [`server::run`], which owns the running daemon. The only place
//! `anyhow` is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;

use thinsnap::admin::api::admin_client::AdminClient;
use thinsnap::admin::api::StatusRequest;
use thinsnap::config::Config;
use thinsnap::engine::{self, Adopt, EngineHandle, Settings, StartTask};
use thinsnap::model::ThinId;
use thinsnap::pool::dm::{self, DmPool};
use thinsnap::pool::ThinPool;
use thinsnap::store::Store;
use thinsnap::{fs, server, status};

#[derive(Parser)]
#[command(
    name = "thinsnap",
    version,
    about = "containerd snapshotter on device-mapper thin provisioning"
)]
struct Cli {
    /// Log format: "text" or "json".
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "THINSNAP_LOG_FORMAT"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve containerd's Snapshots API on the configured unix socket (`address`) and the Admin
    /// API on its own (`admin_address`).
    Serve {
        /// TOML configuration file; without it /etc/thinsnap/config.toml if it exists, else
        /// the embedded defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the pool's space, health and snapshot counts (asks the running daemon on its admin
    /// socket).
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every snapshot's device, the spares, the base and what no record owns (asks the
    /// running daemon); or, with --device or --thin-id, what owns that device.
    Ls {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this kind of entry.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(thinsnap::ls::KINDS))]
        kind: Option<String>,
        /// Only entries in this state (inactive includes awaiting activation).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(thinsnap::ls::STATES))]
        state: Option<String>,
        /// Print what owns this dm device (e.g. tp-snap-12); an error if nothing does.
        #[arg(long, conflicts_with_all = ["thin_id", "kind", "state"])]
        device: Option<String>,
        /// Print what owns this thin id; an error if nothing does.
        #[arg(long, conflicts_with_all = ["kind", "state"])]
        thin_id: Option<u32>,
    },
    /// Pool maintenance.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Grow a loop pool online (asks the running daemon): data and/or metadata file.
    Grow {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// New size of the data file (human units, e.g. 200GiB).
        #[arg(long)]
        data_size: Option<bytesize::ByteSize>,
        /// New size of the metadata file.
        #[arg(long)]
        metadata_size: Option<bytesize::ByteSize>,
    },
    /// A new (or lost) database in front of a pool that holds thin devices: say what to do
    /// with them, once, with the daemon stopped (it refuses to start until then). Runs the
    /// start-up (recovery, the base device) and exits.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["keep_foreign", "reset"])))]
    Adopt {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Keep them as someone else's: never deleted, their thin ids never reused.
        #[arg(long)]
        keep_foreign: bool,
        /// Delete them (their data is lost).
        #[arg(long)]
        reset: bool,
    },
    /// Remove every device of this pool, the pool and its loop devices (loop mode); with
    /// --remove-files also the pool files and the database. The daemon must be stopped.
    Destroy {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        remove_files: bool,
    },
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    if let Err(e) = run(cli) {
        // Said once, on stderr (journald keeps it for the unit): not a log line and then the
        // same text again.
        eprintln!("thinsnap: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, skipping a cause whose text the message before already carries
/// (our error types print their source inline).
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// The configuration a command uses: `--config`, else the installed file if it exists, else
/// the embedded defaults.
fn load_config(explicit: Option<&Path>) -> Result<Config> {
    let installed = Path::new(thinsnap::config::INSTALLED_CONFIG);
    Ok(Config::load(
        Config::path_to_read(explicit, installed).as_deref(),
    )?)
}

fn run(cli: Cli) -> Result<()> {
    let rt = server::runtime().context("cannot start the tokio runtime")?;
    match cli.command {
        Command::Serve { config } => rt.block_on(serve(config.as_deref())),
        Command::Status { config, json } => rt.block_on(status(config.as_deref(), json)),
        Command::Ls {
            config,
            json,
            kind,
            state,
            device,
            thin_id,
        } => {
            let lookup = device
                .map(thinsnap::ls::Lookup::Device)
                .or(thin_id.map(thinsnap::ls::Lookup::ThinId));
            let select = thinsnap::ls::Select { kind, state };
            rt.block_on(ls(config.as_deref(), json, select, lookup))
        }
        Command::Pool {
            command:
                PoolCommand::Destroy {
                    config,
                    remove_files,
                },
        } => destroy(config.as_deref(), remove_files),
        Command::Pool {
            command:
                PoolCommand::Adopt {
                    config,
                    keep_foreign,
                    reset: _,
                },
        } => rt.block_on(adopt(
            config.as_deref(),
            if keep_foreign {
                Adopt::KeepForeign
            } else {
                Adopt::Reset
            },
        )),
        Command::Pool {
            command:
                PoolCommand::Grow {
                    config,
                    data_size,
                    metadata_size,
                },
        } => rt.block_on(grow(config.as_deref(), data_size, metadata_size)),
    }
}

/// Creates the root directory 0700, or checks an existing one: it holds the device metadata, so
/// it must be root's and closed to others. A looser one is refused with the fix.
fn ensure_root(root: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !nix::unistd::geteuid().is_root() {
        bail!("thinsnap must run as root (it drives device-mapper and mounts)");
    }
    if !root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create root directory {}", root.display()))?;
    }
    let meta =
        std::fs::metadata(root).with_context(|| format!("cannot stat {}", root.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "root directory {} is owned by uid {} with mode {:o}; it must be root's and 0700: \
             run `chown root:root {0} && chmod 700 {0}`",
            root.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

async fn serve(config_path: Option<&Path>) -> Result<()> {
    thinsnap::failpoint::announce();
    let config = load_config(config_path)?;
    server::disable_huge_pages();
    // Signal handlers first: a SIGTERM during a long start-up (mkfs of the base) is kept and
    // stops the server as soon as it serves, instead of killing it half way.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let metrics = config
        .metrics
        .address
        .as_deref()
        .map(str::parse::<std::net::SocketAddr>)
        .transpose()
        .context("metrics.address")?;
    info!(root = %config.root.display(), socket = %config.address.display(),
          pool = %config.pool.name, mode = %config.pool.mode, "starting");
    let admin_path = config.admin_path();
    server::check_not_in_use(&config.address)?;
    server::check_not_in_use(&admin_path)?;
    ensure_root(&config.root)?;
    let (engine, starting) = start(&config, None).await?;
    let listener = server::bind(&config.address)?;
    let admin = server::bind(&admin_path)?;
    info!(socket = %admin_path.display(), "admin API on its own socket");
    if starting.is_some() {
        info!(socket = %config.address.display(),
              "serving Stat and List from the database; other calls wait for the pool and recovery");
    } else {
        info!(socket = %config.address.display(), "serving");
    }
    let waiting = engine.clone();
    let shutdown = async move {
        // Ready for systemd (Type=notify; a no-op outside systemd) once the engine is there, not
        // when the socket first answers reads: a start that fails after that stops the server
        // (its error is the daemon's exit status, below) and systemd sees a failed start.
        // This future completes only when the start failed; after a good start it stays pending.
        let start_failed = async {
            if waiting.engine().await.is_ok() {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
            _ = start_failed => {}
        }
        thinsnap::failpoint::release_stalls();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    let served = server::run(listener, admin, engine, metrics, shutdown).await;
    let _ = std::fs::remove_file(&config.address);
    let _ = std::fs::remove_file(&admin_path);
    if let Some(start) = starting {
        start.await.context("the start task failed")??;
    }
    served?;
    Ok(())
}

/// Checks that the kernel has device-mapper (refused before anything is made under root), then
/// starts the engine on the configured pool and database (see `engine::start`).
///
/// Returns an error if device-mapper is missing, or if the pool, the store or recovery fails
/// before serving.
async fn start(config: &Config, adopt: Option<Adopt>) -> Result<(EngineHandle, Option<StartTask>)> {
    dm::check_device_mapper()?;
    let c = config.clone();
    let make_pool = move || DmPool::open(&c).map(|p| Arc::new(p) as Arc<dyn ThinPool>);
    let (fs_config, root) = (config.fs.clone(), config.root.clone());
    let format = move |dev: &Path| fs::format_base(dev, &fs_config, &root);
    let mut settings = Settings::from_config(config);
    settings.adopt = adopt;
    Ok(engine::start(&config.db_path(), make_pool, settings, format).await?)
}

/// `thinsnap pool adopt`: the daemon's start-up with `what` said for the thin devices of a
/// pool the database has no record of (see `engine::ownership`), then exit.
async fn adopt(config_path: Option<&Path>, what: Adopt) -> Result<()> {
    let config = load_config(config_path)?;
    if server::check_not_in_use(&config.address).is_err() {
        bail!(
            "thinsnap is still serving on {}; stop it first",
            config.address.display()
        );
    }
    ensure_root(&config.root)?;
    let (engine, starting) = start(&config, Some(what)).await?;
    if let Some(start) = starting {
        start.await.context("the start task failed")??;
    }
    drop(engine);
    info!(pool = %config.pool.name, ?what, "pool adopted; start the daemon");
    Ok(())
}

/// A channel to the running daemon's admin socket.
async fn reach(config: &Config) -> Result<tonic::transport::Channel> {
    let admin = config.admin_path();
    server::connect(&admin).await.with_context(|| {
        format!(
            "cannot reach thinsnap's admin socket {} (is it running?)",
            admin.display()
        )
    })
}

async fn status(config_path: Option<&Path>, json: bool) -> Result<()> {
    let config = load_config(config_path)?;
    let st = AdminClient::new(reach(&config).await?)
        .status(StatusRequest::default())
        .await
        .context("status call failed")?
        .into_inner();
    print!("{}", thinsnap::status::render(&st, json));
    Ok(())
}

async fn ls(
    config_path: Option<&Path>,
    json: bool,
    select: thinsnap::ls::Select,
    lookup: Option<thinsnap::ls::Lookup>,
) -> Result<()> {
    let config = load_config(config_path)?;
    let inv = AdminClient::new(reach(&config).await?)
        .inventory(thinsnap::admin::api::InventoryRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("ls failed ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    match lookup {
        None => print!("{}", thinsnap::ls::render(&inv, &select, json)),
        Some(what) => {
            let e = thinsnap::ls::lookup(&inv, &what).map_err(anyhow::Error::msg)?;
            if json {
                print!("{}", thinsnap::ls::render_entry_json(e));
            } else {
                let one = thinsnap::admin::api::InventoryResponse {
                    entries: vec![e.clone()],
                    ..inv.clone()
                };
                print!("{}", thinsnap::ls::render(&one, &select, false));
            }
        }
    }
    Ok(())
}

async fn grow(
    config_path: Option<&Path>,
    data: Option<bytesize::ByteSize>,
    meta: Option<bytesize::ByteSize>,
) -> Result<()> {
    let config = load_config(config_path)?;
    let st = AdminClient::new(reach(&config).await?)
        .grow(thinsnap::admin::api::GrowRequest {
            data_size_bytes: data.map(|b| b.as_u64()).unwrap_or(0),
            metadata_size_bytes: meta.map(|b| b.as_u64()).unwrap_or(0),
        })
        .await
        .map_err(|s| anyhow::anyhow!("grow refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    let d = st.data.unwrap_or_default();
    let m = st.metadata.unwrap_or_default();
    println!(
        "pool {}: data {} of {}, metadata {} of {}",
        st.pool_name,
        status::human(d.used_bytes),
        status::human(d.total_bytes),
        status::human(m.used_bytes),
        status::human(m.total_bytes)
    );
    Ok(())
}

fn destroy(config_path: Option<&Path>, remove_files: bool) -> Result<()> {
    let config = load_config(config_path)?;
    if server::check_not_in_use(&config.address).is_err() {
        bail!(
            "thinsnap is still serving on {}; stop it first",
            config.address.display()
        );
    }
    let db = config.db_path();
    let thin_ids: Vec<ThinId> = if db.exists() {
        let store =
            Store::open(&db).context("cannot open the database (is thinsnap still running?)")?;
        store.devices()?.iter().map(|d| d.thin_id).collect()
    } else {
        Vec::new()
    };
    dm::destroy(&config, &thin_ids, remove_files)?;
    if remove_files {
        match std::fs::remove_dir_all(&db) {
            Ok(()) => info!(path = %db.display(), "removed database"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", db.display())),
        }
        let _ = std::fs::remove_dir(&config.root);
    }
    info!(pool = %config.pool.name, "pool destroyed");
    Ok(())
}
