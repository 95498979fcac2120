//! `covet subscribe` and `covet replay`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use covet_client::{
    Client, ConsumedRecord, GroupConsumerConfig, Membership, StartPosition, SubscriptionOptions,
};

use super::output::record_json;
use super::{parse_position, parse_time_ms, Conn};

/// Records fetched per partition ahead of printing.
const WINDOW: u64 = 2000;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// One JSON object per line.
    Json,
    /// The raw value, one per line.
    Value,
}

#[derive(Args, Debug)]
pub struct SubscribeArgs {
    topic: String,
    /// earliest, latest, an offset, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    from: String,
    /// Follow only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Consume as a member of this consumer group: share the topic's
    /// partitions with the group's other members, start from the group's
    /// committed offsets, and acknowledge each record once printed.
    #[arg(long)]
    group: Option<String>,
    /// With --group: records held unacknowledged per partition at most.
    #[arg(long, default_value_t = 100)]
    max_in_flight: u32,
    /// With --group: how long the member may be silent before the group
    /// gives its partitions to the others.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    #[arg(long, value_enum, default_value = "json")]
    format: RecordFormat,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    topic: String,
    /// Replay only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// earliest, an offset, or an RFC 3339 time (inclusive).
    #[arg(long, default_value = "earliest")]
    from: String,
    /// latest, an offset, or an RFC 3339 time (exclusive). `latest` is the
    /// high watermark when the replay starts.
    #[arg(long, default_value = "latest")]
    to: String,
    #[arg(long, value_enum, default_value = "json")]
    format: RecordFormat,
    #[command(flatten)]
    conn: Conn,
}

fn print(out: &mut impl Write, r: &ConsumedRecord, format: RecordFormat) -> std::io::Result<()> {
    match format {
        RecordFormat::Json => writeln!(out, "{}", record_json(r)),
        RecordFormat::Value => {
            out.write_all(&r.value)?;
            out.write_all(b"\n")
        }
    }
}

/// Follows the topic until interrupted.
pub async fn subscribe(a: SubscribeArgs) -> anyhow::Result<()> {
    if let Some(group) = a.group.clone() {
        return subscribe_group(a, group).await;
    }
    let client = a.conn.connect().await?;
    let mut options = SubscriptionOptions::new(a.topic.clone(), parse_position(&a.from, true)?);
    options.partitions = a.partition.map(|p| vec![p]);
    let mut sub = client.subscribe(options).await?;
    loop {
        tokio::select! {
            r = sub.next() => match r {
                Some(r) => {
                    let mut out = std::io::stdout().lock();
                    print(&mut out, &r?, a.format)?;
                    out.flush()?;
                }
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `covet subscribe --group`: joins the group, prints each record it is
/// given, then acknowledges it; leaves the group (committing) on Ctrl-C or
/// SIGTERM.
async fn subscribe_group(a: SubscribeArgs, group: String) -> anyhow::Result<()> {
    if a.partition.is_some() {
        anyhow::bail!("--partition cannot be combined with --group: the group assigns partitions");
    }
    let client = a.conn.connect().await?;
    let mut config = GroupConsumerConfig::new(group.clone(), format!("cli-{}", std::process::id()));
    config.max_in_flight = a.max_in_flight;
    let mut consumer = client.group_consumer(config)?;
    let membership = Membership::join(
        client.clone(),
        &group,
        vec![a.topic.clone()],
        Duration::from_millis(a.session_timeout_ms),
        Arc::new(consumer.assigner()),
    )
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            r = consumer.next() => match r {
                Some(Ok(r)) => {
                    let printed = ConsumedRecord {
                        topic: r.topic.clone(),
                        partition: r.partition,
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        key: r.key.clone(),
                        value: r.value.clone(),
                        headers: r.headers.clone(),
                    };
                    let mut out = std::io::stdout().lock();
                    print(&mut out, &printed, a.format)?;
                    out.flush()?;
                    r.ack();
                }
                // A partition taken over (FENCED) or lost: membership
                // hands out the group's current assignment.
                Some(Err(e)) => tracing::info!(error = %e, "a partition session ended"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    membership.leave().await?;
    consumer.close().await?;
    Ok(())
}

/// Where a replay stops in one partition.
enum End {
    Latest,
    Offset(u64),
    Time(i64),
}

/// Prints each partition's records in range, partition by partition.
pub async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let from = parse_position(&a.from, false)?;
    let end = match a.to.as_str() {
        "latest" => End::Latest,
        s => match s.parse::<u64>() {
            Ok(o) => End::Offset(o),
            Err(_) => End::Time(parse_time_ms(s)?),
        },
    };
    let client = a.conn.connect().await?;
    let partitions = match a.partition {
        Some(p) => vec![p],
        None => (0..client.describe_topic(&a.topic).await?.partitions.len() as u32).collect(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in partitions {
        replay_partition(&client, &a.topic, p, from, &end, a.format, &mut out).await?;
    }
    out.flush()?;
    Ok(())
}

async fn replay_partition(
    client: &Client,
    topic: &str,
    partition: u32,
    from: StartPosition,
    end: &End,
    format: RecordFormat,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut stream = client
        .open_partition(topic, partition, from, WINDOW)
        .await?;
    let stop = match *end {
        End::Latest => stream.high_watermark(),
        End::Offset(o) => o.min(stream.high_watermark()),
        End::Time(t) => {
            // The end is where a subscription at that time would start.
            let probe = client
                .open_partition(topic, partition, StartPosition::Timestamp(t), 0)
                .await?;
            probe.position()
        }
    };
    while stream.position() < stop {
        let Some(records) = stream.next_batch().await? else {
            anyhow::bail!(
                "the broker closed partition {partition}'s stream at offset {}",
                stream.position()
            );
        };
        let mut taken = 0;
        for r in records.iter().take_while(|r| r.offset < stop) {
            print(out, r, format)?;
            taken += 1;
        }
        stream.grant(taken.max(records.len()) as u64).await?;
    }
    Ok(())
}
