//! `covet-bridge`: moves events between NATS and Covet (`covet bridge
//! nats`).
//!
//! It owns the bridge's configuration ([`config`]), the subject templates
//! and key escaping of Covet -> NATS routes ([`subject`]), the two route
//! runners ([`to_covet`]: a JetStream durable pull consumer or a core NATS
//! subscription into a topic; [`to_nats`]: a Covet consumer group into
//! JetStream or core NATS), and the per-route status the `covet bridge
//! status` command reads ([`status`]). Every route keeps a bounded number
//! of messages in flight, so a slow side slows the other; a message the
//! target refuses goes to a dead-letter topic and the route goes on.
//!
//! Delivery guarantees, per mode, are in `docs/nats-bridge.md`.

pub mod config;
pub mod status;
pub mod subject;
pub mod to_covet;
pub mod to_nats;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use config::{BridgeConfig, Direction, NatsConfig, Route, RETRY_BACKOFF};
use status::RouteStatus;

/// Header carrying the NATS subject a record came from.
pub const SUBJECT_HEADER: &str = "nats-subject";
/// Header carrying why a message went to the dead-letter topic.
pub const ERROR_HEADER: &str = "covet-bridge-error";
/// Header carrying the route that wrote a record (NATS -> Covet).
pub const ROUTE_HEADER: &str = "covet-bridge-route";
/// Header carrying the JetStream stream sequence of a record's message.
pub const SEQUENCE_HEADER: &str = "nats-stream-sequence";

/// What a route runner is given.
pub struct RouteContext {
    pub covet: covet_client::Client,
    pub nats: async_nats::Client,
    pub status: Arc<RouteStatus>,
    /// Turns true when the bridge stops: take no more messages, settle
    /// those in flight, return.
    pub stop: watch::Receiver<bool>,
}

/// Connects to NATS with the configured credentials and TLS. The client
/// reconnects by itself for as long as the bridge runs.
pub async fn connect_nats(
    config: &BridgeConfig,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<async_nats::Client> {
    let urls = config.nats_urls()?;
    let addrs = urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("nats.url")?;
    // The first connection is made here, not by the client's own retries:
    // a server that is not up yet is waited for, but credentials or TLS
    // settings it refuses stop the bridge at once, with the reason, where
    // the client would retry them forever in the background.
    let mut attempt = 0u32;
    loop {
        let options = nats_options(&config.nats).await?;
        match options.connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) if nats_refusal(&e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("NATS at {} refused the bridge", urls.join(",")));
            }
            Err(e) => {
                tracing::warn!(urls = %urls.join(","), error = %e, "NATS is not answering; retrying")
            }
        }
        attempt = attempt.saturating_add(1);
        let backoff = (RETRY_BACKOFF * attempt.min(25)).min(std::time::Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => anyhow::bail!("stopped before NATS answered"),
        }
    }
}

/// Whether a failed connection is NATS (or its TLS) saying no, which
/// trying again will not change, rather than NATS not being there yet. A
/// certificate the bridge does not trust (or the server does not) comes as
/// an I/O error that carries the TLS library's own.
fn nats_refusal(e: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::Authentication | K::AuthorizationViolation | K::Tls | K::ServerParse => true,
        K::Dns | K::TimedOut | K::MaxReconnects => false,
        K::Io => {
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let tls = s.downcast_ref::<async_nats::rustls::Error>().is_some()
                    || s.downcast_ref::<std::io::Error>()
                        .and_then(|io| io.get_ref())
                        .is_some_and(|inner| {
                            inner.downcast_ref::<async_nats::rustls::Error>().is_some()
                        });
                if tls {
                    return true;
                }
                source = s.source();
            }
            false
        }
    }
}

async fn nats_options(n: &NatsConfig) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut o = async_nats::ConnectOptions::new()
        .name("covet-bridge")
        // Once connected, the bridge carries on through a NATS restart:
        // the client reconnects forever, and routes retry what failed
        // meanwhile.
        .max_reconnects(None);
    if let (Some(user), Some(password)) = (&n.user, &n.password) {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &n.token {
        o = o.token(token.clone());
    }
    if let Some(path) = &n.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("nats.nkey_seed_file {}", path.display()))?;
        o = o.nkey(seed.trim().to_string());
    }
    if let Some(path) = &n.creds_file {
        o = o
            .credentials_file(path)
            .await
            .with_context(|| format!("nats.creds_file {}", path.display()))?;
    }
    if let Some(ca) = &n.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&n.tls_cert, &n.tls_key) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if n.tls_required {
        o = o.require_tls(true);
    }
    Ok(o)
}

/// Connects to Covet, retrying until it answers or `stop` turns true.
async fn connect_covet(
    brokers: &str,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<covet_client::Client> {
    loop {
        match covet_client::Client::connect(brokers).await {
            Ok(c) => return Ok(c),
            Err(e) => tracing::warn!(%brokers, error = %e, "Covet is not answering; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_BACKOFF * 5) => {}
            _ = stop.wait_for(|s| *s) => anyhow::bail!("stopped before Covet answered"),
        }
    }
}

/// Runs every route of `config` until `stop` turns true, then lets each
/// settle what it has in flight. Returns the first route's failure that
/// it could not carry on from.
pub async fn run(config: BridgeConfig, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let routes = config.routes()?;
    let nats = connect_nats(&config, &mut stop).await?;
    let covet = connect_covet(&config.covet.brokers, &mut stop).await?;
    let statuses: Vec<Arc<RouteStatus>> = routes
        .iter()
        .map(|r| RouteStatus::new(&r.name, describe(r)))
        .collect();
    let mut background = Vec::new();
    background.push(tokio::spawn(status::sample(statuses.clone())));
    if let Some(listen) = &config.status.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("status.listen {listen}"))?;
        tracing::info!(addr = %listener.local_addr()?, "bridge status endpoint");
        background.push(tokio::spawn(status::serve(listener, statuses.clone())));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (route, status) in routes.into_iter().zip(statuses) {
        let ctx = RouteContext {
            covet: covet.clone(),
            nats: nats.clone(),
            status,
            stop: stop.clone(),
        };
        tasks.spawn(async move {
            let name = route.name.clone();
            let result = match &route.direction {
                Direction::ToCovet(spec) => to_covet::run(&route, spec, ctx).await,
                Direction::ToNats(spec) => to_nats::run(&route, spec, ctx).await,
            };
            result.with_context(|| format!("route {name:?}"))
        });
    }
    // Printed once every route is set up and running, for scripts and tests.
    println!("covet bridge ready: {} route(s)", tasks.len());
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "route stopped");
            first_error.get_or_insert(e);
        }
    }
    for b in background {
        b.abort();
    }
    // Bounded: while NATS is unreachable a flush waits for a reconnect
    // that may never come, and a stopping bridge must exit.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), nats.flush()).await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn describe(r: &Route) -> String {
    match &r.direction {
        Direction::ToCovet(s) => match &s.source {
            config::NatsSource::JetStream { stream, .. } => {
                format!(
                    "nats {} (stream {stream}) -> covet {}",
                    s.from_subject, s.to_topic
                )
            }
            config::NatsSource::Core => {
                format!("nats {} (core) -> covet {}", s.from_subject, s.to_topic)
            }
        },
        Direction::ToNats(s) => format!(
            "covet {} -> nats {}{}",
            s.from_topic,
            s.to_subject.source(),
            if s.jetstream {
                " (jetstream)"
            } else {
                " (core)"
            }
        ),
    }
}
