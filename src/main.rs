//! The `flowtel` command.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use flowtel::config::{self, Overrides};

#[derive(Parser)]
#[command(
    name = "flowtel",
    version,
    about = "Network flows from the kernel, shipped as OpenTelemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count flows and export them (to the terminal when no OTLP endpoint is set).
    Run(RunArgs),
    /// Validate a configuration and print the effective settings.
    CheckConfig(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long, short = 'c', env = "FLOWTEL_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Kernel source: auto, ebpf or conntrack.
    #[arg(long)]
    source: Option<String>,
    /// Aggregation and export interval, e.g. 10s.
    #[arg(long)]
    interval: Option<String>,
    /// OTLP endpoint, e.g. http://localhost:4317.
    #[arg(long)]
    endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf.
    #[arg(long)]
    protocol: Option<String>,
    /// Terminal output: table or json.
    #[arg(long)]
    output: Option<String>,
    /// Read conntrack of this network namespace (e.g. /var/run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Address for /healthz and /readyz ("" disables them).
    #[arg(long)]
    health_listen: Option<String>,
    /// Make the kernel track connections here if nothing else does (adds a
    /// match-only nft table, removed on exit).
    #[arg(long)]
    conntrack_ensure_tracking: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::CheckConfig(args) => {
            match config::load(args.config.as_deref(), &env, &Overrides::default()) {
                Ok(cfg) => match serde_json::to_string_pretty(&cfg) {
                    Ok(text) => {
                        println!("configuration is valid; effective settings:\n{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("flowtel: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("flowtel: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(args) => {
            let overrides = Overrides {
                source: args.source,
                interval: args.interval,
                endpoint: args.endpoint,
                protocol: args.protocol,
                console_format: args.output,
                netns: args.netns,
                health_listen: args.health_listen,
                ensure_tracking: args.conntrack_ensure_tracking,
            };
            let cfg = match config::load(args.config.config.as_deref(), &env, &overrides) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("flowtel: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&cfg.log.level, &env);
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("flowtel: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(flowtel::pipeline::run(cfg, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("flowtel: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(level: &str, env: &HashMap<String, String>) {
    let filter = env
        .get("RUST_LOG")
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
