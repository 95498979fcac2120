//! `covet bridge nats` (run a bridge) and `covet bridge status` (ask one).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use covet_bridge::config::{BridgeConfig, RouteConfig};
use tokio::sync::watch;

use super::output::print_table;
use super::TableFormat;

#[derive(Subcommand, Debug)]
pub enum BridgeCommand {
    /// Move events between NATS and Covet: subjects into topics, topics
    /// into subjects (routes from --config, or one route from flags).
    Nats(Box<NatsArgs>),
    /// Show a running bridge's routes: lag, rate, errors.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated (overrides the config's nats.url).
    #[arg(long, env = "COVET_BRIDGE_NATS")]
    nats: Option<String>,
    /// The bridge config file (TOML; see docs/nats-bridge.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seed Covet brokers (overrides the config's covet.brokers).
    #[arg(long, env = "COVET_BROKER")]
    broker: Option<String>,
    /// Serve the status endpoint on HOST:PORT (overrides status.listen).
    #[arg(long)]
    status_listen: Option<String>,
    /// One NATS -> Covet route: the subject (wildcards allowed) ...
    #[arg(long, requires = "to_topic", conflicts_with_all = ["from_topic", "to_subject"])]
    from_subject: Option<String>,
    /// ... the JetStream stream to read it from (omit for core NATS, at most once) ...
    #[arg(long, requires = "from_subject")]
    stream: Option<String>,
    /// ... the topic it goes to ...
    #[arg(long, requires = "from_subject")]
    to_topic: Option<String>,
    /// ... and the subject token (1-based) to use as the record key.
    #[arg(long, requires = "from_subject")]
    key_token: Option<usize>,
    /// One Covet -> NATS route: the topic ...
    #[arg(long, requires = "to_subject")]
    from_topic: Option<String>,
    /// ... and the subject template ({topic}, {partition}, {offset}, {key}).
    #[arg(long, requires = "from_topic")]
    to_subject: Option<String>,
    /// Publish to core NATS rather than JetStream.
    #[arg(long, requires = "from_topic")]
    core: bool,
    /// Name of the flag route (default "cli").
    #[arg(long, default_value = "cli")]
    route_name: String,
    /// Messages in flight per route.
    #[arg(long)]
    max_in_flight: Option<usize>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The bridge's status endpoint (its --status-listen).
    #[arg(long, env = "COVET_BRIDGE_STATUS", default_value = "127.0.0.1:7481")]
    bridge: String,
    /// table or json (default: table on a terminal, JSON otherwise).
    #[arg(long)]
    format: Option<TableFormat>,
}

pub async fn run(cmd: BridgeCommand) -> anyhow::Result<()> {
    match cmd {
        BridgeCommand::Nats(args) => nats(*args).await,
        BridgeCommand::Status(args) => status(args).await,
    }
}

/// The configuration the flags and the file make together (flags win);
/// every error names its key, and nothing starts before it is whole.
fn config_of(args: &NatsArgs) -> anyhow::Result<BridgeConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the bridge config {}", path.display()))?;
            BridgeConfig::from_toml(&text).with_context(|| path.display().to_string())?
        }
        None => BridgeConfig::from_toml("").context("an empty config")?,
    };
    if let Some(nats) = &args.nats {
        config.nats.url = None;
        config.nats.urls = nats.split(',').map(|s| s.trim().to_string()).collect();
    }
    if let Some(b) = &args.broker {
        config.covet.brokers = b.clone();
    }
    if let Some(l) = &args.status_listen {
        config.status.listen = Some(l.clone());
    }
    if args.from_subject.is_some() || args.from_topic.is_some() {
        config.routes.push(RouteConfig {
            name: Some(args.route_name.clone()),
            from_subject: args.from_subject.clone(),
            stream: args.stream.clone(),
            to_topic: args.to_topic.clone(),
            key_token: args.key_token,
            from_topic: args.from_topic.clone(),
            to_subject: args.to_subject.clone(),
            jetstream: args.from_topic.as_ref().map(|_| !args.core),
            max_in_flight: args.max_in_flight,
            ..Default::default()
        });
    }
    // Checked now, before anything connects.
    config.nats_urls()?;
    config.routes()?;
    Ok(config)
}

async fn nats(args: NatsArgs) -> anyhow::Result<()> {
    let config = config_of(&args)?;
    // A long-running service: it logs at info unless COVET_LOG says
    // otherwise (then `cli::run` has set logging up already).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        super::broker::shutdown_signal().await;
        tracing::info!("stopping: settling messages in flight");
        stop_tx.send_replace(true);
    });
    covet_bridge::run(config, stop).await
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let routes = covet_bridge::status::fetch(&args.bridge).await?;
    match TableFormat::resolve(args.format) {
        TableFormat::Json => println!("{}", serde_json::to_string_pretty(&routes)?),
        TableFormat::Table => {
            let rows: Vec<Vec<String>> = routes
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        r.description.clone(),
                        r.lag.to_string(),
                        format!("{:.0}/s", r.rate),
                        r.delivered.to_string(),
                        r.in_flight.to_string(),
                        r.duplicates_skipped.to_string(),
                        r.dead_lettered.to_string(),
                        r.errors.to_string(),
                        r.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ROUTE",
                    "FLOW",
                    "LAG",
                    "RATE",
                    "DELIVERED",
                    "IN FLIGHT",
                    "DUPLICATES SKIPPED",
                    "DEAD",
                    "ERRORS",
                    "LAST ERROR",
                ],
                &rows,
            );
        }
    }
    Ok(())
}
