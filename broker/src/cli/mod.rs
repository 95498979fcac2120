//! Command-line definitions and dispatch.

mod bench;
mod bridge;
mod broker;
mod cluster;
mod group;
mod output;
mod publish;
mod read;
mod topic;

use clap::{Args, Parser, Subcommand, ValueEnum};
use covet_client::{Client, StartPosition};

/// Covet: a Raft-replicated event-streaming broker.
#[derive(Parser, Debug)]
#[command(name = "covet", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker node.
    Broker(broker::BrokerArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish records: VALUE, or one record per line of standard input.
    Publish(publish::PublishArgs),
    /// Follow a topic and print records as they are committed.
    Subscribe(read::SubscribeArgs),
    /// Print the records of a range and exit.
    Replay(read::ReplayArgs),
    /// Measure a running broker.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// List, describe, reset and delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Bridge NATS and Covet; show a running bridge's routes.
    #[command(subcommand)]
    Bridge(bridge::BridgeCommand),
}

/// Where to find the cluster.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Seed brokers, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "COVET_BROKER", default_value = covet_client::DEFAULT_BROKER)]
    broker: String,
}

impl Conn {
    async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.broker).await?)
    }
}

/// Output of listing and describing commands.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    Table,
    Json,
}

impl TableFormat {
    /// Table on a terminal, JSON for scripts, unless chosen.
    fn resolve(choice: Option<TableFormat>) -> TableFormat {
        use std::io::IsTerminal;
        choice.unwrap_or(if std::io::stdout().is_terminal() {
            TableFormat::Table
        } else {
            TableFormat::Json
        })
    }
}

pub async fn run(cli: Cli, started: std::time::Instant) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Broker(_)) {
        // Client commands log to stderr only when asked (COVET_LOG=debug).
        if let Ok(filter) = std::env::var("COVET_LOG") {
            if let Ok(filter) = tracing_subscriber::EnvFilter::try_new(filter) {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            }
        }
    }
    match cli.command {
        Command::Broker(args) => broker::run(args, started).await,
        Command::Topic(cmd) => topic::run(cmd).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Subscribe(args) => read::subscribe(args).await,
        Command::Replay(args) => read::replay(args).await,
        Command::Bench(cmd) => bench::run(cmd).await,
        Command::Cluster(cmd) => cluster::run(cmd).await,
        Command::Group(cmd) => group::run(cmd).await,
        Command::Bridge(cmd) => bridge::run(cmd).await,
    }
}

/// One line for an error: the client error's own text (which starts with
/// the broker's reason) and its causes.
pub fn describe_error(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    text.replace('\n', " ")
}

/// Parses `earliest`, `latest`, an offset, or an RFC 3339 time.
fn parse_position(s: &str, allow_latest: bool) -> anyhow::Result<StartPosition> {
    match s {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" if allow_latest => Ok(StartPosition::Latest),
        _ => {
            if let Ok(offset) = s.parse::<u64>() {
                return Ok(StartPosition::Offset(offset));
            }
            parse_time_ms(s).map(StartPosition::Timestamp)
        }
    }
}

fn parse_time_ms(s: &str) -> anyhow::Result<i64> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow::anyhow!(
            "'{s}' is not a position: use earliest, latest, an offset, or an RFC 3339 time"
        )
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow::anyhow!("'{s}' is before 1970"))?
        .as_millis();
    Ok(i64::try_from(ms)?)
}
