use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc returns freed memory to the system and fragments less than the system allocator
/// under many threads: the server's resident memory stays near what it holds.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's memory-return settings. mimalloc's defaults favour speed over resident
/// memory: arenas are committed eagerly and freed pages are purged after a second. With
/// 10,000 functions that kept 280-310 MB resident where these settings keep about 210 MB
/// (transient answers such as a 13 MB `/metrics` text left their pages behind). Here freed
/// pages go back at once and arenas are committed as used. A `MIMALLOC_*` variable in the
/// environment still wins.
mod allocator {
    use libmimalloc_sys::{mi_option_set, mi_option_t};

    /// Positions in mimalloc 3's `mi_option_e` (the bundled version); the test below checks
    /// that the settings took and that the table has the layout they were read from.
    pub const ARENA_EAGER_COMMIT: mi_option_t = 4;
    pub const PURGE_DELAY: mi_option_t = 15;

    /// Runs before `main` and before mimalloc's own start-up (priority 101), so the first
    /// arena is already reserved with these settings.
    #[used]
    #[link_section = ".init_array.00100"]
    static TUNE_BEFORE_START: extern "C" fn() = tune;

    extern "C" fn tune() {
        for (option, variable, value) in [
            (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
            (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
        ] {
            if std::env::var_os(variable).is_none() {
                // SAFETY: sets an option slot; mimalloc reads these when it reserves or
                // purges memory, and both values are documented as valid.
                unsafe { mi_option_set(option, value) };
            }
        }
    }

    #[cfg(test)]
    mod tests {
        fn get(option: super::mi_option_t) -> std::os::raw::c_long {
            // SAFETY: a plain read of an option slot within the enum.
            unsafe { libmimalloc_sys::mi_option_get(option) }
        }

        #[test]
        fn settings_apply_at_the_bundled_allocators_positions() {
            // The start-up hook runs in this test binary too.
            if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
                assert_eq!(get(super::ARENA_EAGER_COMMIT), 0);
            }
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(get(super::PURGE_DELAY), 0);
            }
            // Slots these positions are counted among keep their documented defaults
            // (purge_decommits 1, os_tag 100, max_errors 32, max_warnings 32): the table has
            // the layout the positions were read from.
            assert_eq!([get(5), get(18), get(19), get(20)], [1, 100, 32, 32]);
        }
    }
}

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
    /// Show the whole loop on this machine: deploy, invoke, load, scale 1 → 4 and back.
    Demo {
        /// Load in requests per second.
        #[arg(long, default_value_t = 60)]
        rate: u64,
        /// Longest the load runs, in seconds.
        #[arg(long, default_value_t = 60)]
        max_load_secs: u64,
        /// Directory for timeline.json, timeline.csv and timeline.svg (default: a
        /// faastastic-demo-PID directory in the system's temporary directory, which keeps only
        /// them after the run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Scale through real Prometheus and Alertmanager (started by the demo with the shipped
        /// rule and route) instead of the internal query policy.
        #[arg(long)]
        prometheus: bool,
        /// The Prometheus program for --prometheus.
        #[arg(long, default_value = "prometheus")]
        prometheus_bin: String,
        /// The Alertmanager program for --prometheus.
        #[arg(long, default_value = "prometheus-alertmanager")]
        alertmanager_bin: String,
        /// Keep the server and its web UI up after the run, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Prometheus rule files for the autoscaler.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Scaling policies: try them before enabling them.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run one datacenter's platform for a control plane's `remote` adapter.
    Agent {
        /// The datacenter's name (as in the control plane's `[[datacenters]]`).
        #[arg(long)]
        datacenter: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// File holding the token the control plane presents (optional with --client-ca:
        /// a second factor beside the client certificate).
        #[arg(long, required_unless_present_any = ["no_auth", "client_ca"])]
        token_file: Option<PathBuf>,
        /// Turn authentication off (loopback experiments only).
        #[arg(long)]
        no_auth: bool,
        /// Where replica files live.
        #[arg(long, default_value = "faastastic-agent-data")]
        data_dir: PathBuf,
        /// Serve TLS with this PEM certificate (chain); re-read when the file changes.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require a client certificate signed by this PEM CA (mutual TLS).
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
    },
    /// Check an OpenFaaS gateway or provider (this one or any other) against what faas-cli,
    /// Terraform and the OpenFaaS gateway send and accept. Prints a pass/fail table; exits 1
    /// when a required check fails.
    Conformance {
        /// Base URL of the gateway or provider.
        #[arg(long, env = "OPENFAAS_URL", default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Basic auth user.
        #[arg(long, default_value = "admin")]
        user: String,
        /// File holding the Basic auth password (without one, the auth checks are skipped).
        #[arg(long, conflicts_with = "password")]
        password_file: Option<PathBuf>,
        /// The Basic auth password.
        #[arg(long, env = "OPENFAAS_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Namespace to deploy the test functions into.
        #[arg(long, default_value = "openfaas-fn")]
        namespace: String,
        /// Image of the test functions: it must run a watchdog that executes `cat` and `env`.
        #[arg(long, default_value = "ghcr.io/openfaas/alpine:latest")]
        image: String,
        /// Seconds a deployed or scaled function may take to become ready.
        #[arg(long, default_value_t = 60)]
        ready_timeout_secs: u64,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Trust this PEM CA for an https:// gateway (instead of the public roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Run one function replica (started by the local platform; settings from the environment).
    #[command(hide = true)]
    Watchdog,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Lint rule files: PromQL parses, and alerts meant for faastastic keep function_name,
    /// have a valid scale_action, a `for`, and no label templated from the value.
    /// Prints `file:line: message`; exits 1 on any problem.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Replay a JSON-lines series of signals through the policy engine and print the replica
    /// timeline. Each line: {"t": SECONDS or "at": RFC3339, "action": "firing|resolved|step_down|to|tick", "replicas": N, "key": "..."}
    Simulate {
        /// The series (`-` for standard input).
        series: PathBuf,
        /// Config whose [autoscale] section gives the defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A function label, as deployed (repeatable), e.g. com.openfaas.scale.max=10.
        #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Replicas at the start.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// The function as `name.namespace`, to match the config's [[autoscale.policies]].
        #[arg(long, default_value = "function.openfaas-fn")]
        function: String,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn simulate(
    series: &std::path::Path,
    config: Option<&std::path::Path>,
    labels: &[String],
    function: &str,
    start: u64,
    json: bool,
) -> Result<(), String> {
    use faastastic::autoscale::labels::policy_for;
    use faastastic::cli::simulate;
    let cfg = match config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut map = std::collections::BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        map.insert(k.to_string(), v.to_string());
    }
    let dep = faastastic::model::FunctionDeployment {
        labels: Some(map),
        ..Default::default()
    };
    let (policy, _) = policy_for(function, &dep, &cfg.autoscale).map_err(|e| e.join("\n"))?;
    let text = if series.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read standard input: {e}"))?
    } else {
        std::fs::read_to_string(series)
            .map_err(|e| format!("cannot read {}: {e}", series.display()))?
    };
    let rows = simulate::simulate(&policy, start, &text, cfg.autoscale.tick_interval)
        .map_err(|e| e.join("\n"))?;
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row).map_err(|e| e.to_string())?);
        }
    } else {
        println!(
            "policy: {}",
            serde_json::to_string(&policy).map_err(|e| e.to_string())?
        );
        print!("{}", simulate::table(&rows));
    }
    Ok(())
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
                    for warning in &cfg.warnings {
                        tracing::warn!("{warning}");
                    }
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
        Command::Policy {
            command:
                PolicyCommand::Simulate {
                    series,
                    config,
                    labels,
                    start,
                    function,
                    json,
                },
        } => {
            return match simulate(&series, config.as_deref(), &labels, &function, start, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Demo {
            rate,
            max_load_secs,
            out,
            prometheus,
            prometheus_bin,
            alertmanager_bin,
            keep,
        } => {
            telemetry::init_tracing_at("warn");
            runtime.block_on(faastastic::cli::demo::run(
                faastastic::cli::demo::DemoOptions {
                    rate,
                    max_load: std::time::Duration::from_secs(max_load_secs),
                    out,
                    alerts: prometheus.then_some(faastastic::cli::demo::AlertPath {
                        prometheus: prometheus_bin,
                        alertmanager: alertmanager_bin,
                    }),
                    keep,
                },
            ))
        }
        Command::Rules {
            command: RulesCommand::Check { files },
        } => {
            let mut problems = 0;
            for file in &files {
                let findings = faastastic::cli::rules::check_file(file);
                if findings.is_empty() {
                    println!("{}: ok", file.display());
                }
                for f in &findings {
                    println!("{f}");
                }
                problems += findings.len();
            }
            return if problems == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Conformance {
            gateway,
            user,
            password_file,
            password,
            namespace,
            image,
            ready_timeout_secs,
            json,
            ca_file,
        } => {
            let password = match password_file {
                Some(file) => match std::fs::read_to_string(&file) {
                    Ok(p) => Some(p.trim().to_string()),
                    Err(e) => {
                        eprintln!("cannot read the password file {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => password,
            };
            let opts = faastastic::cli::conformance::Options {
                gateway,
                user,
                password,
                namespace,
                image,
                ready_timeout: std::time::Duration::from_secs(ready_timeout_secs),
                ca_file,
            };
            let report = match runtime.block_on(faastastic::cli::conformance::run(opts)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("conformance: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("a report serializes")
                );
            } else {
                print!("{}", report.table());
            }
            return if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Agent {
            datacenter,
            listen,
            token_file,
            no_auth,
            data_dir,
            tls_cert,
            tls_key,
            client_ca,
        } => {
            telemetry::init_tracing();
            if let Err(e) = faastastic::model::validate_dns_label("datacenter", &datacenter) {
                eprintln!("--datacenter: {e}");
                return ExitCode::from(2);
            }
            let token = match token_file.filter(|_| !no_auth) {
                None => None,
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(t) if !t.trim().is_empty() => {
                        platform::isolation::warn_if_readable_by_others(&path, "--token-file");
                        Some(t.trim().to_string())
                    }
                    Ok(_) => {
                        eprintln!("--token-file {}: the file is empty", path.display());
                        return ExitCode::from(2);
                    }
                    Err(e) => {
                        eprintln!("--token-file {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                },
            };
            runtime.block_on(faastastic::agent::run(faastastic::agent::AgentConfig {
                listen,
                datacenter,
                token,
                data_dir,
                local: Config::default().local,
                tls: tls_cert.zip(tls_key).map(|(cert_file, key_file)| {
                    faastastic::tls::ListenerTls {
                        cert_file,
                        key_file,
                        client_ca,
                    }
                }),
            }))
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
