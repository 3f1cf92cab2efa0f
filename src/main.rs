//! The `chatbox` binary: command line, logging, signals; the server is the library.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use chatbox::auth::{mint, now_secs, Claims};
use chatbox::config::{render, Config, LogFormat};
use chatbox::store::Backend;
use clap::{CommandFactory as _, Parser, Subcommand};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Thread-per-core WebSocket chat backend for AI customer support.
///
/// Without a subcommand, serves. Settings come from the configuration file, then
/// from CHATBOX_* environment variables, which win.
#[derive(Parser)]
#[command(
    name = "chatbox",
    version,
    after_help = "Every configuration key is also an environment variable, CHATBOX_<KEY>; \
                  `chatbox --help` lists them, `chatbox genconfig` prints them as a file.",
    after_long_help = render::env_help()
)]
struct Cli {
    /// Read settings from this TOML file (CHATBOX_* variables override it)
    // An OsString parser, so that an empty CHATBOX_CONFIG means no file (as an empty
    // value unsets every other optional key) rather than a parse error.
    #[arg(long, value_name = "FILE", env = "CHATBOX_CONFIG", global = true,
          value_parser = clap::builder::ValueParser::os_string())]
    config: Option<std::ffi::OsString>,
    /// Development mode: generates a JWT secret and an encryption key if none are
    /// set, and prints ready-made user and admin tokens
    #[arg(long)]
    dev: bool,
    /// Validate the configuration, print a summary and exit (2 with a list of what
    /// to fix)
    #[arg(long, alias = "test")]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the configured store's schema (SQLite tables, MongoDB
    /// indexes) and exit; idempotent, and every start does it too
    Migrate,
    /// Copy every session (messages stay sealed), audit trail and pending
    /// notification from one store to the other; sessions the target has already
    /// are left alone, so it can be run again
    Copy {
        /// The store to read: sqlite or mongo
        #[arg(long, value_parser = backend)]
        from: Backend,
        /// The store to write: sqlite or mongo
        #[arg(long, value_parser = backend)]
        to: Backend,
    },
    /// Print a commented TOML configuration file with every key at its default
    Genconfig {
        /// Print README.md's configuration table instead
        #[arg(long)]
        markdown: bool,
    },
}

fn backend(name: &str) -> Result<Backend, String> {
    Backend::parse(name).ok_or_else(|| "expected sqlite or mongo".to_owned())
}

/// Raises the soft open-files limit to the hard one: every connection is a
/// descriptor, and container runtimes commonly start processes with a soft limit
/// of 1024 under a much higher hard one. What it got is logged either way.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
    }
    let soft = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            lim.rlim_cur = soft;
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-files limit");
        }
    }
    tracing::info!(
        open_files_max = lim.rlim_cur,
        was = soft,
        "open-files limit"
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Genconfig { markdown }) => {
            say(&if markdown {
                render::markdown_table()
            } else {
                render::genconfig()
            });
            return ExitCode::SUCCESS;
        }
        Some(Command::Copy { from, to }) if from == to => Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "copy needs two different stores",
            )
            .exit(),
        _ => {}
    }
    let mut config = match load(&cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Migrate) => return report(storage(&config, None)),
        Some(Command::Copy { from, to }) => return report(storage(&config, Some((from, to)))),
        Some(Command::Genconfig { .. }) | None => {}
    }
    if cli.check_config {
        let models: Vec<String> = chatbox::llm::model_configs(&config)
            .iter()
            .map(|m| format!("{} ({:?})", m.id, m.provider))
            .collect();
        println!(
            "configuration OK: listen {} with {} cores, prefix {:?}, {} connections per user, models {}",
            config.listen,
            config.core_count(),
            config.path_prefix,
            config.max_connections_per_user,
            models.join(", ")
        );
        println!("{}", files_line(&config));
        return ExitCode::SUCCESS;
    }
    if cli.dev {
        if let Err(e) = dev_defaults(&mut config) {
            eprintln!("chatbox: {e:#}");
            return ExitCode::from(1);
        }
    }
    match run(config, cli.dev) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("chatbox: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What `--check-config` says of file storage: the store, where, and what chose it.
fn files_line(config: &Config) -> String {
    let (store, why) = config.file_store_choice();
    let place = match store {
        "s3" => format!(
            "bucket {} at {}",
            config.s3_bucket.as_deref().unwrap_or_default(),
            // The origin only: a URL may carry a user and password.
            config
                .s3_endpoint
                .as_deref()
                .and_then(|e| url::Url::parse(e).ok())
                .map_or("AWS S3".into(), |u| u.origin().ascii_serialization())
        ),
        "gridfs" => format!("GridFS in database {}", config.mongo_database),
        _ => config.data_dir.join("files").display().to_string(),
    };
    format!("files: {store} ({place}), chosen by {why}")
}

/// Loads and checks the configuration, starting the log on the way (its format is
/// a key); on failure, says why on stderr and returns the exit code (2).
fn load(cli: &Cli) -> Result<Config, ExitCode> {
    let file = cli
        .config
        .as_deref()
        .filter(|f| !f.is_empty())
        .map(Path::new);
    let loaded = Config::load(file).map_err(|e| {
        eprintln!("chatbox: {e}");
        ExitCode::from(2)
    })?;
    // Loading ran before there was a log: what it noticed is logged now.
    init_logging(loaded.config.log_format);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    for derived in &loaded.derived {
        tracing::info!("{derived}");
    }
    // Storage commands need no JWT secret or key: messages are copied sealed.
    let lenient = cli.dev || cli.command.is_some();
    chatbox::check_config(&loaded.config, lenient).map_err(|e| {
        eprintln!("chatbox: {e}");
        ExitCode::from(2)
    })?;
    Ok(loaded.config)
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatbox: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `migrate` (no stores given) or `copy` (from, to).
fn storage(config: &Config, copy: Option<(Backend, Backend)>) -> anyhow::Result<()> {
    use chatbox::store::open;
    let (_rt, pool) = chatbox::pool::PoolRuntime::start(2, 1024).context("blocking pool")?;
    let name = |b: Backend| match b {
        Backend::Sqlite => format!("the embedded store in {}", config.data_dir.display()),
        Backend::Mongo => format!("MongoDB database {}", config.mongo_database),
    };
    let Some((from, to)) = copy else {
        let backend = Backend::configured(config);
        open(config, backend, pool).with_context(|| format!("migrating {}", name(backend)))?;
        say(&format!(
            "{} is ready (schema and indexes up to date)",
            name(backend)
        ));
        return Ok(());
    };
    let source =
        open(config, from, pool.clone()).with_context(|| format!("opening {}", name(from)))?;
    let target = open(config, to, pool.clone()).with_context(|| format!("opening {}", name(to)))?;
    let done = pool
        .block_on(async move { chatbox::store::copy::copy(&*source, &*target).await })
        .context("blocking pool")?
        .with_context(|| format!("copying {} to {}", name(from), name(to)))?;
    say(&format!(
        "copied {} sessions ({} messages, {} audit entries) and {} pending notifications from {} to {}; \
         {} sessions were there already, {} audit entries of unknown kinds skipped",
        done.sessions,
        done.messages,
        done.events,
        done.notifications,
        name(from),
        name(to),
        done.sessions_present,
        done.events_unknown
    ));
    Ok(())
}

fn run(config: Config, dev: bool) -> anyhow::Result<()> {
    raise_open_files();
    let prefix = config.path_prefix.clone();
    let secret = config.jwt_secret.clone().unwrap_or_default();
    // Catch signals before anything is announced: a SIGTERM that arrives right after
    // the readiness line must drain, not kill the process with the default action.
    // signal-hook queues what arrives before the thread below reads it.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    let server = chatbox::start(config, hooks()).context("start-up failed")?;
    let trigger = server.trigger();
    std::thread::Builder::new()
        .name("chatbox-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal = sig, "shutting down gracefully");
                    trigger.shutdown();
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })
        .context("cannot start the signal thread")?;

    let addr = server.local_addr();
    tracing::info!(%addr, drivers = ?server.drivers(), "chatbox {VERSION} started");
    // One line on stdout that scripts and tests can wait for.
    say(&format!("chatbox listening on http://{addr}{prefix}"));
    if dev {
        print_dev_tokens(secret.as_bytes(), &format!("{addr}{prefix}"));
    }
    server.join()?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Production has no hooks. Debug builds only: `CHATBOX_TEST_HANG=<fault point>`
/// makes the thread that passes that point (`flush`, `answer`, ...) hang for good,
/// so that tests can show shutdown's deadline holding against a stuck step.
fn hooks() -> chatbox::Hooks {
    #[cfg(debug_assertions)]
    if let Ok(point) = std::env::var("CHATBOX_TEST_HANG") {
        tracing::warn!(point = %point, "debug build: this fault point hangs (CHATBOX_TEST_HANG)");
        return chatbox::Hooks {
            fault: Some(std::sync::Arc::new(move |at: &str| {
                if at == point {
                    tracing::warn!(point = at, "fault point reached: hanging here for good");
                    loop {
                        std::thread::park();
                    }
                }
            })),
            ..Default::default()
        };
    }
    chatbox::Hooks::default()
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn random_hex32() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Fills in the secrets `--dev` needs. They are kept in `data_dir/dev-secrets.toml`
/// (mode 0600) so a restarted dev server can still read its own stored messages.
fn dev_defaults(config: &mut Config) -> anyhow::Result<()> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct DevSecrets {
        jwt_secret: String,
        encryption_key: String,
    }
    let path = config.data_dir.join("dev-secrets.toml");
    match chatbox::secret::check_private_file(&path) {
        Ok(Some(warning)) => tracing::warn!("{warning}"),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot read the mode of {}: {e}", path.display()),
    }
    let saved: Option<DevSecrets> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| toml::from_str(&t).ok());
    let secrets = match saved {
        Some(s) => s,
        None => {
            let s = DevSecrets {
                jwt_secret: random_hex32(),
                encryption_key: random_hex32(),
            };
            // 0700, as the store makes it; start-up warns of a looser existing one.
            chatbox::secret::private_dir(&config.data_dir)
                .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
            write_private(&path, &toml::to_string(&s)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            s
        }
    };
    config.jwt_secret.get_or_insert(secrets.jwt_secret);
    config.encryption_key.get_or_insert(secrets.encryption_key);
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// The dev tokens, and a console link for each side: the token rides in the URL
/// fragment, which browsers never send, so it reaches no access log.
fn print_dev_tokens(secret: &[u8], base: &str) {
    let exp = now_secs() + 24 * 3600;
    let user = mint(
        secret,
        &Claims {
            sub: "dev-user".into(),
            name: Some("Dev User".into()),
            roles: vec![],
            exp,
        },
    );
    let admin = mint(
        secret,
        &Claims {
            sub: "dev-admin".into(),
            name: Some("Dev Admin".into()),
            roles: vec!["admin".into()],
            exp,
        },
    );
    say("dev mode: secrets are kept in the data directory (dev-secrets.toml); tokens are valid for 24 h");
    say(&format!(
        "  agent console: http://{base}/console/#token={admin}"
    ));
    say(&format!(
        "  user chat:     http://{base}/console/chat.html#token={user}"
    ));
    say(&format!("  user token:  {user}"));
    say(&format!("  admin token: {admin}"));
    say(&format!("  try:  websocat 'ws://{base}/ws?token={user}'"));
}

/// Prints a line to stdout, ignoring a closed pipe: whoever read our banner may
/// have gone away, and that must not take the server down (println! would panic).
fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}
