//! Command line: run the relay, check a configuration, hash or make a relay key, or run
//! the mock provider. Wiring lives in `server.rs`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use pingora_core::server::configuration::Opt;
use stream_relay::{auth, config::Config, mock, server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage:
  stream-relay [-c FILE] [-d] [-u]     run the relay (default FILE: conf/relay.yaml)
                                       -d: daemonize, -u: take over from a running relay
  stream-relay -t [-c FILE]            check the configuration and exit
  stream-relay check [-c FILE]         same as -t
  stream-relay hash-key [KEY]          print the SHA-256 of a relay key (KEY or stdin)
  stream-relay new-key                 make a random relay key and print it with its hash
  stream-relay mock [--listen ADDR] [--key KEY] [--control-key KEY] [--tls-cert PEM --tls-key PEM]
                                       run the mock provider (default 127.0.0.1:18080)
  stream-relay rows replay [-c FILE] [--spool DIR]
                                       send a row spool to the configuration's ClickHouse
                                       (never a row twice) and exit: 0 when it is empty,
                                       1 when batches are left (ClickHouse down, or a relay
                                       holds the spool), 2 for a usage or configuration error
";

fn main() -> ExitCode {
    stream_relay::logsink::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("hash-key") => hash_key(args.get(1)),
        Some("new-key") => new_key(),
        Some("mock") => run_mock(&args[1..]),
        Some("check") => run_relay(&args[1..], true),
        Some("rows") if args.get(1).map(String::as_str) == Some("replay") => {
            rows_replay(&args[2..])
        }
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => run_relay(&args, false),
    }
}

fn run_relay(args: &[String], mut check_only: bool) -> ExitCode {
    let mut conf = PathBuf::from("conf/relay.yaml");
    let mut daemon = false;
    let mut upgrade = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--conf" => match it.next() {
                Some(p) => conf = PathBuf::from(p),
                None => return usage_error("-c needs a file"),
            },
            "-t" | "--test" => check_only = true,
            "-d" | "--daemon" => daemon = true,
            "-u" | "--upgrade" => upgrade = true,
            other => return usage_error(&format!("unknown argument `{other}`")),
        }
    }
    let mut config = match Config::load(&conf) {
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
        upgrade,
        daemon,
        ..Opt::default()
    };
    match server::build(&config, &conf, opt) {
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

fn run_mock(args: &[String]) -> ExitCode {
    let mut listen = "127.0.0.1:18080".to_string();
    let mut key = None;
    let mut control_key = None;
    let mut cert = None;
    let mut tls_key = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next();
        match (a.as_str(), value) {
            ("--listen", Some(v)) => listen = v.clone(),
            ("--key", Some(v)) => key = Some(v.clone()),
            ("--control-key", Some(v)) => control_key = Some(v.clone()),
            ("--tls-cert", Some(v)) => cert = Some(v.clone()),
            ("--tls-key", Some(v)) => tls_key = Some(v.clone()),
            _ => return usage_error(&format!("bad mock argument `{a}`")),
        }
    }
    let tls = match (cert, tls_key) {
        (Some(c), Some(k)) => match mock::tls_acceptor(&c, &k) {
            Ok(a) => Some(a),
            Err(e) => return usage_error(&e),
        },
        (None, None) => None,
        _ => return usage_error("--tls-cert and --tls-key go together"),
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
fn rows_replay(args: &[String]) -> ExitCode {
    let mut conf = PathBuf::from("conf/relay.yaml");
    let mut spool = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = match a.as_str() {
            "-c" | "--conf" | "--config" | "--spool" => match it.next() {
                Some(v) => PathBuf::from(v),
                None => return usage_error(&format!("{a} needs a value")),
            },
            other => return usage_error(&format!("unknown argument `{other}`")),
        };
        if a == "--spool" {
            spool = Some(value);
        } else {
            conf = value;
        }
    }
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
    eprintln!("stream-relay: {msg}\n{USAGE}");
    ExitCode::from(2)
}
