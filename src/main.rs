use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use faastastic::config::Config;
use faastastic::{platform, server, telemetry};

#[derive(Parser)]
#[command(
    name = "faastastic",
    version,
    about = "OpenFaaS-compatible functions on the platforms you already run, scaled from metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway/provider API and the local platform.
    Serve {
        /// TOML configuration file (every key is optional).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where state, credentials and replica files live (overrides `data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Turn authentication off (local experiments only).
        #[arg(long)]
        no_auth: bool,
    },
    /// Run one function replica (started by the local platform; settings from the environment).
    #[command(hide = true)]
    Watchdog,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime can start");
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            no_auth,
        } => {
            telemetry::init_tracing();
            let cfg = match config {
                Some(path) => Config::load(&path),
                None => Ok(Config::default()),
            };
            match cfg {
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
                Ok(mut cfg) => {
                    if let Some(listen) = listen {
                        cfg.listen = listen;
                    }
                    if let Some(dir) = data_dir {
                        cfg.data_dir = dir;
                    }
                    if no_auth {
                        cfg.auth.enabled = false;
                    }
                    runtime.block_on(server::serve(cfg))
                }
            }
        }
        Command::Watchdog => runtime.block_on(platform::watchdog::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
