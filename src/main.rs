//! Command line: run the relay, check a configuration, hash or make a relay key, or run
//! the mock provider. Wiring lives in `server.rs`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pingora_core::server::configuration::Opt;
use stream_relay::{auth, config::Config, mock, server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes, for every command: 0 done; 1 the work could not be finished (`rows
/// replay` with batches left, the mock unable to listen); 2 a usage or configuration
/// error.
const AFTER_HELP: &str = "Exit codes: 0 done; 1 not finished (rows replay: batches left; mock: cannot listen); 2 usage or configuration error.";

/// stream-relay: a relay for LLM and TTS APIs on Pingora. Without a command it runs the
/// relay (`stream-relay -c FILE [-d] [-u]`, or `-t` to check the file).
#[derive(Parser)]
#[command(
    name = "stream-relay",
    version = VERSION,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Check the configuration and exit (as `check`).
    #[arg(short = 't', long = "test")]
    test: bool,
}

/// The build's version and commit.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("STREAM_RELAY_COMMIT"),
    ")"
);

/// `-c FILE`, the configuration file, as every command that reads one takes it.
#[derive(Args, Clone)]
struct ConfArg {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "conf",
        visible_alias = "config",
        value_name = "FILE",
        default_value = "conf/relay.yaml"
    )]
    conf: PathBuf,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    conf: ConfArg,
    /// Run in the background (daemonize).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Take over from a running relay: its listening sockets, then its open streams finish
    /// in it (graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Check the configuration and exit (0 valid, 2 not, naming the key).
    #[command(after_help = AFTER_HELP)]
    Check {
        #[command(flatten)]
        conf: ConfArg,
    },
    /// Relay keys: make one, or hash one for `tenants[].key_sha256`.
    #[command(subcommand, after_help = AFTER_HELP)]
    Key(KeyCommand),
    /// Print the SHA-256 of a relay key (as `key hash`).
    #[command(hide = true)]
    HashKey { key: Option<String> },
    /// Make a random relay key (as `key new`).
    #[command(hide = true)]
    NewKey,
    /// Run the built-in mock provider (OpenAI, Anthropic and audio streams).
    #[command(after_help = AFTER_HELP)]
    Mock(MockArgs),
    /// Request rows.
    #[command(subcommand, after_help = AFTER_HELP)]
    Rows(RowsCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a random relay key and print it with its hash.
    New,
    /// Print the SHA-256 of a relay key (the argument, or the first line of stdin).
    Hash {
        /// The key; read from stdin when absent (keeps it out of the shell history).
        key: Option<String>,
    },
}

#[derive(Subcommand)]
enum RowsCommand {
    /// Send a row spool to the configuration's ClickHouse (never a row twice) and exit:
    /// 0 when it is empty, 1 when batches are left (ClickHouse down, or a relay holds the
    /// spool), 2 for a usage or configuration error.
    Replay {
        /// The configuration file: its `rows.clickhouse`.
        #[command(flatten)]
        conf: ConfArg,
        /// The spool directory, instead of the configuration's `spool_dir`.
        #[arg(long, value_name = "DIR")]
        spool: Option<PathBuf>,
    },
}

#[derive(Args)]
struct MockArgs {
    /// Address to listen on (port 0: any free one, printed at start).
    #[arg(long, default_value = "127.0.0.1:18080", value_name = "ADDR")]
    listen: String,
    /// The provider key the mock expects (any when absent).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// The key `/mock/stats` and `/mock/control` need.
    #[arg(long, value_name = "KEY")]
    control_key: Option<String>,
    /// Serve TLS with this certificate (PEM), with --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<String>,
    /// The TLS certificate's key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<String>,
}

fn main() -> ExitCode {
    stream_relay::logsink::init();
    let cli = Cli::parse();
    match cli.command {
        None => run_relay(&cli.run, cli.test),
        Some(Command::Run(args)) => run_relay(&args, false),
        Some(Command::Check { conf }) => {
            let args = RunArgs {
                conf,
                daemon: false,
                upgrade: false,
            };
            run_relay(&args, true)
        }
        Some(Command::Key(KeyCommand::Hash { key }) | Command::HashKey { key }) => {
            hash_key(key.as_ref())
        }
        Some(Command::Key(KeyCommand::New) | Command::NewKey) => new_key(),
        Some(Command::Mock(args)) => run_mock(args),
        Some(Command::Rows(RowsCommand::Replay { conf, spool })) => rows_replay(conf.conf, spool),
    }
}

fn run_relay(args: &RunArgs, check_only: bool) -> ExitCode {
    let conf = &args.conf.conf;
    let mut config = match Config::load(conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", conf.display());
            return ExitCode::from(2);
        }
    };
    // A cap the file limit cannot hold is lowered here (with a warning); `-t` warns alike.
    config.max_connections =
        stream_relay::fdlimit::fit_max_connections(config.max_connections, check_only);
    if config.per_address_defaulted {
        log::info!(
            "listen.max_connections_per_address is not set and listen.proxy {} is beyond loopback: each client address may hold {} open connections (set it to change this; 0 for no cap, as behind a balancer)",
            config.proxy_listen,
            config.max_connections_per_address
        );
    }
    if check_only {
        println!("{}: configuration is valid", conf.display());
        return ExitCode::SUCCESS;
    }
    let opt = Opt {
        upgrade: args.upgrade,
        daemon: args.daemon,
        ..Opt::default()
    };
    match server::build(&config, conf, opt) {
        Ok((server, rows)) => {
            server.run(pingora_core::server::RunArgs::default());
            // The runtimes may still be dropping tasks (a fast shutdown does not wait): the
            // requests they cut send their rows as they drop.
            if let Err(e) = rows.finish(Duration::from_secs(10)) {
                log::error!("{e}");
            }
            stream_relay::logsink::flush();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{}: {e}", conf.display());
            ExitCode::from(2)
        }
    }
}

fn hash_key(arg: Option<&String>) -> ExitCode {
    let key = match arg {
        Some(k) => k.clone(),
        None => {
            let mut s = String::new();
            if std::io::stdin().read_to_string(&mut s).is_err() {
                return usage_error("cannot read the key from stdin");
            }
            s.trim().to_string()
        }
    };
    if key.is_empty() {
        return usage_error("the key is empty");
    }
    println!("{}", auth::hash_key_hex(&key));
    ExitCode::SUCCESS
}

fn new_key() -> ExitCode {
    let mut bytes = [0u8; 24];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        eprintln!("cannot read /dev/urandom");
        return ExitCode::FAILURE;
    }
    let key: String = std::iter::once("sk-relay-".to_string())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect();
    println!("key:        {key}");
    println!("key_sha256: {}", auth::hash_key_hex(&key));
    ExitCode::SUCCESS
}

fn run_mock(args: MockArgs) -> ExitCode {
    let MockArgs {
        listen,
        key,
        control_key,
        tls_cert: cert,
        tls_key,
    } = args;
    let tls = match (cert, tls_key) {
        (Some(c), Some(k)) => match mock::tls_acceptor(&c, &k) {
            Ok(a) => Some(a),
            Err(e) => return usage_error(&e),
        },
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("mock: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().expect("bound address");
        // Tests read this line to learn the port when --listen ends in :0.
        println!("mock listening on {addr}");
        let _ = std::io::stdout().flush();
        mock::Mock::with_control_key(key, control_key)
            .serve(listener, tls)
            .await;
        ExitCode::SUCCESS
    })
}

/// `rows replay`: a spool (a decommissioned node's, say) to ClickHouse, until it is empty
/// or ClickHouse stops taking it.
fn rows_replay(conf: PathBuf, spool: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(&conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", conf.display());
            return ExitCode::from(2);
        }
    };
    let Some(mut ch) = config.rows_clickhouse.clone() else {
        eprintln!("{}: rows.clickhouse is not configured", conf.display());
        return ExitCode::from(2);
    };
    if let Some(dir) = spool {
        ch.spool_dir = dir;
    }
    let metrics = std::sync::Arc::new(stream_relay::metrics::Metrics::new(false));
    let d =
        stream_relay::rows::clickhouse::drain_spool(&ch, metrics, Duration::from_secs(24 * 3600));
    println!(
        "{}: {} batches ({} rows) sent to ClickHouse, {} left",
        ch.spool_dir.display(),
        d.batches,
        d.rows,
        d.left
    );
    match (d.left, d.stopped) {
        (0, _) => ExitCode::SUCCESS,
        (_, why) => {
            eprintln!("stopped: {}", why.unwrap_or_else(|| "unknown".into()));
            ExitCode::from(1)
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("stream-relay: {msg} (see --help)");
    ExitCode::from(2)
}
