//! The `chatbox` binary: command line, logging, signals; the server is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chatbox::auth::{mint, now_secs, Claims};
use chatbox::config::{Config, LogFormat};

const USAGE: &str = "\
usage: chatbox [--config FILE] [--dev] [--check-config]
       chatbox migrate [--config FILE]
       chatbox copy --from sqlite|mongo --to sqlite|mongo [--config FILE]

  migrate          create or update the configured store's schema (SQLite tables,
                   MongoDB indexes) and exit; idempotent, and every start does it too
  copy             copy every session (messages stay sealed), audit trail and
                   pending notification from one store to the other; sessions the
                   target has already are left alone, so it can be run again

  --config FILE    read settings from a TOML file (CHATBOX_* variables override it;
                   CHATBOX_CONFIG=FILE works too)
  --dev            development mode: generates a JWT secret and an encryption key
                   if none are set, and prints ready-made user and admin tokens
  --check-config   validate the configuration, print a summary, and exit
";

struct Args {
    config: Option<PathBuf>,
    dev: bool,
    check: bool,
    command: Command,
}

enum Command {
    Serve,
    Migrate,
    Copy {
        from: chatbox::store::Backend,
        to: chatbox::store::Backend,
    },
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: std::env::var_os("CHATBOX_CONFIG").map(PathBuf::from),
        dev: false,
        check: false,
        command: Command::Serve,
    };
    let backend = |v: Option<String>| {
        v.as_deref()
            .and_then(chatbox::store::Backend::parse)
            .ok_or("--from and --to take sqlite or mongo")
    };
    let (mut from, mut to) = (None, None);
    let mut it = std::env::args().skip(1).peekable();
    match it.peek().map(String::as_str) {
        Some("migrate") => args.command = Command::Migrate,
        Some("copy") => {
            args.command = Command::Copy {
                from: chatbox::store::Backend::Sqlite,
                to: chatbox::store::Backend::Mongo,
            }
        }
        _ => {}
    }
    if !matches!(args.command, Command::Serve) {
        it.next();
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "--from" if matches!(args.command, Command::Copy { .. }) => {
                from = Some(backend(it.next())?)
            }
            "--to" if matches!(args.command, Command::Copy { .. }) => {
                to = Some(backend(it.next())?)
            }
            "--config" => args.config = Some(it.next().ok_or("--config needs a file")?.into()),
            "--dev" => args.dev = true,
            "--check-config" | "--test" => args.check = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Command::Copy { .. } = args.command {
        let (Some(from), Some(to)) = (from, to) else {
            return Err("copy needs --from and --to".into());
        };
        if from == to {
            return Err("copy needs two different stores".into());
        }
        args.command = Command::Copy { from, to };
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("chatbox: {msg}");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Storage commands need no JWT secret or key: messages are copied sealed.
    let lenient = args.dev || !matches!(args.command, Command::Serve);
    let mut config =
        match Config::load(args.config.as_deref()).and_then(|c| c.validate(lenient).map(|_| c)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("chatbox: {e}");
                return ExitCode::from(2);
            }
        };
    init_logging(config.log_format);
    match args.command {
        Command::Serve => {}
        Command::Migrate => return report(storage(&config, None)),
        Command::Copy { from, to } => return report(storage(&config, Some((from, to)))),
    }
    if args.check {
        println!(
            "configuration OK: listen {} with {} cores, prefix {:?}, {} connections per user, provider {:?}",
            config.listen,
            config.core_count(),
            config.path_prefix,
            config.max_connections_per_user,
            config.llm_provider
        );
        return ExitCode::SUCCESS;
    }
    if args.dev {
        if let Err(e) = dev_defaults(&mut config) {
            eprintln!("chatbox: {e:#}");
            return ExitCode::from(1);
        }
    }
    match run(config, args.dev) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("chatbox: {e:#}");
            ExitCode::from(1)
        }
    }
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
fn storage(
    config: &Config,
    copy: Option<(chatbox::store::Backend, chatbox::store::Backend)>,
) -> anyhow::Result<()> {
    use chatbox::store::{open, Backend};
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
    let server = chatbox::start(config, chatbox::Hooks::default()).context("start-up failed")?;
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
    tracing::info!(%addr, drivers = ?server.drivers(), "chatbox started");
    // One line on stdout that scripts and tests can wait for.
    say(&format!("chatbox listening on http://{addr}{prefix}"));
    if dev {
        print_dev_tokens(secret.as_bytes(), &format!("ws://{addr}{prefix}/ws"));
    }
    server.join()?;
    tracing::info!("shutdown complete");
    Ok(())
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
            std::fs::create_dir_all(&config.data_dir)
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

fn print_dev_tokens(secret: &[u8], ws_url: &str) {
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
    say(&format!("  user token:  {user}"));
    say(&format!("  admin token: {admin}"));
    say(&format!("  try:  websocat '{ws_url}?token={user}'"));
}

/// Prints a line to stdout, ignoring a closed pipe: whoever read our banner may
/// have gone away, and that must not take the server down (println! would panic).
fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}
