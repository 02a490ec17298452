use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadex::config::Config;
use leadex::sim::{Behaviour, BidSpec, BuyerSim, parse_range_ms};
use leadex::startup::{Application, hash_key};
use leadex::{demo, telemetry};

// mimalloc: less CPU per allocation than glibc's malloc and memory given back after bursts
// (BENCHMARKS.md). The baseline uses it too, so the ratio compares like with like.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "leadex", version, about = "Real-time ping-post lead exchange")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the exchange from a TOML config.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Overrides [server] listen (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// `text` or `json`; overrides [server] log_format.
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Create the ScyllaDB keyspace and tables of [storage] (idempotent).
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the exchange on embedded defaults with simulated buyers.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Submit this many sample leads, print a summary, and exit.
        #[arg(long)]
        leads: Option<usize>,
        /// Keep the demo's data here instead of a temporary folder.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Leads in flight at once with --leads.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Run one simulated buyer (POST /ping, POST /post, GET /stats).
    BuyerSim {
        #[arg(long)]
        listen: String,
        /// A price (`12.50`), a range (`10-40`) or `none`.
        #[arg(long, default_value = "10")]
        bid: String,
        /// Ping answer time in ms: `20` or `20-80`.
        #[arg(long, default_value = "0")]
        latency_ms: String,
        /// Post answer time in ms: `5` or `5-20`.
        #[arg(long, default_value = "0")]
        post_latency_ms: String,
        /// Share of posts refused, 0.0 to 1.0.
        #[arg(long, default_value_t = 0.0)]
        reject_rate: f64,
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Read an API key on stdin and print its sha-256 for `api_key_sha256`.
    HashKey,
    /// Generate a strong new API key and print it with its sha-256.
    Keygen,
    /// Drive `POST /api/leads` open-loop at a fixed rate and print latency and outcomes.
    Loadgen(leadex::loadgen::LoadgenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            log_format,
        } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("leadex: configuration error\n{e}");
                    return ExitCode::from(2);
                }
            };
            telemetry::init_logging(log_format.as_deref().unwrap_or(&config.server.log_format));
            let result = actix_rt::System::new().block_on(async move {
                let app = Application::build(config, listen.as_deref())
                    .await
                    .map_err(|e| e.to_string())?;
                app.run_until_stopped().await.map_err(|e| e.to_string())
            });
            report(result)
        }
        Command::Migrate { config } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("leadex: configuration error\n{e}");
                    return ExitCode::from(2);
                }
            };
            if config.storage.backend != "scylla" {
                eprintln!(
                    "leadex migrate: [storage] backend is `{}`; only `scylla` has a schema to apply",
                    config.storage.backend
                );
                return ExitCode::from(2);
            }
            telemetry::init_logging(&config.server.log_format);
            let storage = config.storage;
            let result = actix_rt::System::new().block_on(async move {
                let applied = leadex::storage::scylla::schema::migrate(&storage)
                    .await
                    .map_err(|e| e.to_string())?;
                println!(
                    "schema applied to keyspace `{}` ({applied} statements)",
                    storage.keyspace
                );
                Ok(())
            });
            report(result)
        }
        Command::Demo {
            listen,
            leads,
            data,
            concurrency,
        } => {
            // With --leads the summary is the point; per-lead log lines would bury it.
            let level = if leads.is_some() {
                "warn"
            } else {
                "info,actix_server=warn"
            };
            telemetry::init_logging_at("text", level);
            let options = demo::DemoOptions {
                listen,
                leads,
                data,
                concurrency,
            };
            report(actix_rt::System::new().block_on(demo::run(options)))
        }
        Command::BuyerSim {
            listen,
            bid,
            latency_ms,
            post_latency_ms,
            reject_rate,
            workers,
        } => {
            telemetry::init_logging("text");
            let behaviour = (|| -> Result<Behaviour, String> {
                Ok(Behaviour {
                    bid: BidSpec::parse(&bid)?,
                    ping_latency_ms: parse_range_ms(&latency_ms)?,
                    post_latency_ms: parse_range_ms(&post_latency_ms)?,
                    reject_rate: reject_rate.clamp(0.0, 1.0),
                })
            })();
            let behaviour = match behaviour {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("leadex buyer-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            report(
                actix_rt::System::new()
                    .block_on(BuyerSim::serve_forever(&listen, behaviour, workers))
                    .map_err(|e| e.to_string()),
            )
        }
        Command::HashKey => {
            let mut key = String::new();
            if std::io::stdin().read_to_string(&mut key).is_err() || key.trim().is_empty() {
                eprintln!("leadex hash-key: give the key on standard input");
                return ExitCode::from(2);
            }
            println!("{}", hash_key(&key));
            ExitCode::SUCCESS
        }
        Command::Keygen => {
            let key = demo::new_api_key();
            println!("api key:        {key}\napi_key_sha256: {}", hash_key(&key));
            ExitCode::SUCCESS
        }
        Command::Loadgen(args) => report(leadex::loadgen::run(args)),
    }
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leadex: {e}");
            ExitCode::FAILURE
        }
    }
}
