//! The bridge's configuration: one TOML file (`--config`), or one route
//! given by flags. Everything is checked before anything starts; an error
//! names the key it is about (`route "orders-in": to_topic is missing`).
//!
//! ```toml
//! [nats]
//! url = "nats://127.0.0.1:4222"        # or urls = ["nats://a:4222", ...]
//! creds_file = "/etc/covet/bridge.creds" # or user/password, token, nkey_seed_file
//! tls_ca = "/etc/covet/nats-ca.pem"      # tls_cert / tls_key for a client certificate
//!
//! [covet]
//! brokers = "127.0.0.1:7420"
//!
//! [[route]]                              # NATS -> Covet
//! name = "orders-in"
//! from_subject = "orders.>"
//! stream = "ORDERS"                      # JetStream (at least once); omit for core NATS
//! to_topic = "orders"
//! key_token = 2                          # optional: the subject's 2nd token is the key
//!
//! [[route]]                              # Covet -> NATS
//! name = "orders-out"
//! from_topic = "orders"
//! to_subject = "covet.orders.{key}"
//! jetstream = true                       # publish with Nats-Msg-Id; false: core NATS
//! ```

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Records in flight per route by default: NATS messages taken and not yet
/// acknowledged by Covet, or Covet records taken and not yet acknowledged
/// by NATS.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The whole bridge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub covet: CovetConfig,
    /// Where `covet bridge status` asks (HTTP, JSON at `/status`).
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

/// How the bridge reaches NATS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// One server URL (`nats://host:port`, `tls://host:port`).
    pub url: Option<String>,
    /// Several, any of which may answer.
    #[serde(default)]
    pub urls: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and nkey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate(s) to verify the server with (PEM); turns TLS on.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that ask.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse a server that does not offer TLS.
    #[serde(default)]
    pub tls_required: bool,
}

/// How the bridge reaches Covet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CovetConfig {
    /// Seed brokers, `host:port[,host:port...]`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
}

impl Default for CovetConfig {
    fn default() -> Self {
        CovetConfig {
            brokers: default_brokers(),
        }
    }
}

fn default_brokers() -> String {
    covet_client::DEFAULT_BROKER.to_string()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// `host:port` of the status endpoint; none without it.
    pub listen: Option<String>,
}

/// One route as written in the file; [`BridgeConfig::routes`] checks and
/// turns each into a [`Route`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Option<String>,
    // NATS -> Covet
    pub from_subject: Option<String>,
    /// The JetStream stream to read through a durable pull consumer; none
    /// reads core NATS (at most once).
    pub stream: Option<String>,
    /// The durable consumer's name (default `covet-bridge-<name>`).
    pub durable: Option<String>,
    pub to_topic: Option<String>,
    /// The subject token (1-based) that becomes the record key.
    pub key_token: Option<usize>,
    // Covet -> NATS
    pub from_topic: Option<String>,
    /// The consumer group reading the topic (default `covet-bridge-<name>`).
    pub group: Option<String>,
    /// The subject template: `{topic}`, `{partition}`, `{offset}`, `{key}`.
    pub to_subject: Option<String>,
    /// Publish to JetStream (with `Nats-Msg-Id`, acknowledged); false:
    /// core NATS. Default true.
    pub jetstream: Option<bool>,
    // Both
    pub max_in_flight: Option<usize>,
    /// Where refused messages go (default `<to_topic or from_topic>.dlq`).
    pub dead_letter_topic: Option<String>,
}

/// A checked route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub direction: Direction,
    /// Messages in flight at most (see [`DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
    /// Covet topic refused messages are written to, with the reason in the
    /// `covet-bridge-error` header.
    pub dead_letter_topic: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    ToCovet(ToCovet),
    ToNats(ToNats),
}

/// NATS -> Covet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToCovet {
    pub from_subject: String,
    pub source: NatsSource,
    pub to_topic: String,
    /// 1-based subject token used as the record key.
    pub key_token: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsSource {
    /// A durable pull consumer on a stream: at least once, deduplicated.
    JetStream { stream: String, durable: String },
    /// A core NATS subscription: at most once.
    Core,
}

/// Covet -> NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToNats {
    pub from_topic: String,
    pub group: String,
    pub to_subject: crate::subject::Template,
    /// JetStream publish with `Nats-Msg-Id` (deduplicated, acknowledged)
    /// rather than core NATS.
    pub jetstream: bool,
}

impl BridgeConfig {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str) -> Result<BridgeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(format!("bridge config: {}", e.message())))
    }

    /// The NATS server URLs, at least one.
    pub fn nats_urls(&self) -> Result<Vec<String>, ConfigError> {
        let mut urls = self.nats.urls.clone();
        urls.extend(self.nats.url.iter().cloned());
        if urls.is_empty() {
            return err("nats.url is missing (or nats.urls, or --nats)");
        }
        for u in &urls {
            if u.parse::<async_nats::ServerAddr>().is_err() {
                return err(format!("nats.url: {u:?} is not a NATS server URL"));
            }
        }
        Ok(urls)
    }

    /// Every route, checked.
    pub fn routes(&self) -> Result<Vec<Route>, ConfigError> {
        if self.routes.is_empty() {
            return err("no route: add a [[route]] to the config, or --from-subject/--to-topic or --from-topic/--to-subject");
        }
        let n = &self.nats;
        if n.password.is_some() != n.user.is_some() {
            return err("nats.user and nats.password go together");
        }
        let auths = [
            n.user.is_some(),
            n.token.is_some(),
            n.nkey_seed_file.is_some(),
            n.creds_file.is_some(),
        ];
        if auths.iter().filter(|a| **a).count() > 1 {
            return err("nats: give one of user/password, token, nkey_seed_file, creds_file");
        }
        if n.tls_cert.is_some() != n.tls_key.is_some() {
            return err("nats.tls_cert and nats.tls_key go together");
        }
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            let route = r.check(i)?;
            if !names.insert(route.name.clone()) {
                return err(format!("route {:?}: the name is used twice", route.name));
            }
            out.push(route);
        }
        Ok(out)
    }
}

impl RouteConfig {
    fn check(&self, index: usize) -> Result<Route, ConfigError> {
        let name = match &self.name {
            Some(n) if valid_name(n) => n.clone(),
            Some(n) => {
                return err(format!(
                    "route {n:?}: name may hold only letters, digits, '-' and '_'"
                ))
            }
            None => format!("route-{}", index + 1),
        };
        let at = |msg: &str| ConfigError(format!("route {name:?}: {msg}"));
        let max_in_flight = self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if !(1..=100_000).contains(&max_in_flight) {
            return Err(at("max_in_flight must be between 1 and 100000"));
        }
        let direction = match (&self.from_subject, &self.from_topic) {
            (Some(_), Some(_)) => return Err(at("give from_subject or from_topic, not both")),
            (None, None) => {
                return Err(at(
                    "from_subject (NATS -> Covet) or from_topic (Covet -> NATS) is missing",
                ))
            }
            (Some(subject), None) => {
                for (key, set) in [
                    ("from_topic", false),
                    ("group", self.group.is_some()),
                    ("to_subject", self.to_subject.is_some()),
                    ("jetstream", self.jetstream.is_some()),
                ] {
                    if set {
                        return Err(at(&format!(
                            "{key} is for Covet -> NATS routes (this one has from_subject)"
                        )));
                    }
                }
                if !valid_subject(subject, true) {
                    return Err(at(&format!(
                        "from_subject {subject:?} is not a NATS subject"
                    )));
                }
                let Some(to_topic) = &self.to_topic else {
                    return Err(at("to_topic is missing"));
                };
                if let Some(t) = self.key_token {
                    let tokens = subject.split('.').count();
                    if t == 0 || (t > tokens && !subject.ends_with('>')) {
                        return Err(at(&format!(
                            "key_token {t} is not a token of {subject:?} (1 to {tokens})"
                        )));
                    }
                }
                let source = match &self.stream {
                    Some(stream) => NatsSource::JetStream {
                        stream: stream.clone(),
                        durable: self
                            .durable
                            .clone()
                            .unwrap_or_else(|| format!("covet-bridge-{name}")),
                    },
                    None if self.durable.is_some() => {
                        return Err(at("durable needs stream (a JetStream stream to read)"))
                    }
                    None => NatsSource::Core,
                };
                Direction::ToCovet(ToCovet {
                    from_subject: subject.clone(),
                    source,
                    to_topic: to_topic.clone(),
                    key_token: self.key_token,
                })
            }
            (None, Some(topic)) => {
                for (key, set) in [
                    ("to_topic", self.to_topic.is_some()),
                    ("stream", self.stream.is_some()),
                    ("durable", self.durable.is_some()),
                    ("key_token", self.key_token.is_some()),
                ] {
                    if set {
                        return Err(at(&format!(
                            "{key} is for NATS -> Covet routes (this one has from_topic)"
                        )));
                    }
                }
                let Some(template) = &self.to_subject else {
                    return Err(at("to_subject is missing"));
                };
                let to_subject = crate::subject::Template::parse(template)
                    .map_err(|e| at(&format!("to_subject: {e}")))?;
                Direction::ToNats(ToNats {
                    from_topic: topic.clone(),
                    group: self
                        .group
                        .clone()
                        .unwrap_or_else(|| format!("covet-bridge-{name}")),
                    to_subject,
                    jetstream: self.jetstream.unwrap_or(true),
                })
            }
        };
        let topic = match &direction {
            Direction::ToCovet(r) => &r.to_topic,
            Direction::ToNats(r) => &r.from_topic,
        };
        Ok(Route {
            dead_letter_topic: self
                .dead_letter_topic
                .clone()
                .unwrap_or_else(|| format!("{topic}.dlq")),
            name,
            direction,
            max_in_flight,
        })
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A NATS subject: dot-separated non-empty tokens without whitespace;
/// with `wildcards`, `*` as a whole token and `>` as the whole last one.
pub fn valid_subject(s: &str, wildcards: bool) -> bool {
    if s.is_empty() {
        return false;
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return false;
        }
        let wild = *t == "*" || (*t == ">" && i == tokens.len() - 1);
        if t.contains(['*', '>']) && !(wildcards && wild) {
            return false;
        }
    }
    true
}

/// How long a bridge waits between attempts to reach a side that is down.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Route>, ConfigError> {
        BridgeConfig::from_toml(text)?.routes()
    }

    #[test]
    fn both_directions_parse() {
        let routes = parse(
            r#"
            [nats]
            url = "nats://127.0.0.1:4222"
            [[route]]
            name = "in"
            from_subject = "orders.>"
            stream = "ORDERS"
            to_topic = "orders"
            key_token = 2
            [[route]]
            name = "out"
            from_topic = "orders"
            to_subject = "covet.{topic}.{key}"
            "#,
        )
        .unwrap();
        assert_eq!(routes.len(), 2);
        match &routes[0].direction {
            Direction::ToCovet(r) => {
                assert_eq!(
                    r.source,
                    NatsSource::JetStream {
                        stream: "ORDERS".into(),
                        durable: "covet-bridge-in".into()
                    }
                );
                assert_eq!(r.key_token, Some(2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(routes[0].dead_letter_topic, "orders.dlq");
        match &routes[1].direction {
            Direction::ToNats(r) => {
                assert!(r.jetstream);
                assert_eq!(r.group, "covet-bridge-out");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[nats]\nurl = \"x\"\nbogus = 1\n", "bogus"),
            ("[[route]]\nname = \"a\"\nfrom_subject = \"x\"\n", "to_topic is missing"),
            ("[[route]]\nname = \"a\"\nfrom_subject = \"x\"\nfrom_topic = \"t\"\n", "not both"),
            ("[[route]]\nname = \"a\"\nfrom_subject = \"x\"\nto_topic = \"t\"\nto_subject = \"s\"\n", "to_subject is for Covet -> NATS"),
            ("[[route]]\nname = \"a\"\nfrom_topic = \"t\"\n", "to_subject is missing"),
            ("[[route]]\nname = \"a\"\nfrom_subject = \"a b\"\nto_topic = \"t\"\n", "from_subject \"a b\""),
            ("[[route]]\nname = \"a\"\nfrom_subject = \"a.b\"\nto_topic = \"t\"\nkey_token = 3\n", "key_token 3"),
            ("[[route]]\nname = \"a\"\nfrom_topic = \"t\"\nto_subject = \"x.{nope}\"\n", "to_subject"),
            ("[[route]]\nname = \"a\"\nfrom_topic = \"t\"\nto_subject = \"x\"\nmax_in_flight = 0\n", "max_in_flight"),
            ("[[route]]\nname = \"a b\"\nfrom_topic = \"t\"\nto_subject = \"x\"\n", "name may hold"),
            ("", "no route"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e:?} does not say {want:?}");
        }
    }

    #[test]
    fn subjects() {
        assert!(valid_subject("a.b.c", false));
        assert!(valid_subject("a.*.>", true));
        assert!(!valid_subject("a.*", false));
        assert!(!valid_subject("a..b", true));
        assert!(!valid_subject("a.>.b", true));
        assert!(!valid_subject("a b", true));
        assert!(!valid_subject("", true));
    }
}
