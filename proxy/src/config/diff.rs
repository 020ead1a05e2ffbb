//! The typed reload diff: which fields differ between the running [`Config`] and a new one, and
//! what a reload does about each.
//!
//! [`diff`] destructures every struct whose fields are treated differently without `..`, so a
//! field added to [`Config`] (or to [`Backend`], [`Upstream`], [`TlsListener`]) does not compile
//! until it is classified here. A struct classified whole (`[server]`, `[health]`,
//! `[cluster]`, a backend's ramp) is compared whole, so a field added to it inherits its class.
//! The test at the bottom goes the other way: it changes every key the file declares
//! ([`super::file::keys`]) and checks the diff reports it, as the class the key declares.

use std::net::SocketAddr;
use std::path::Path;

use super::file::Reload;
use super::{Backend, Config, TlsListener, Upstream};

/// What a reload does with a changed field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The backend list, and each backend's limit, rate, ramp, address, Host and TLS: applied
    /// in place.
    Backends,
    /// The queue bound and deadline: applied in place.
    Queue,
    /// `Retry-After`, client timeouts and connection caps, size limits and upstream timeouts:
    /// applied in place (for new connections and requests).
    Settings,
    /// The access log target: reopened in place.
    AccessLog,
    /// The TLS listener's certificate and key files: re-read in place.
    Certificate,
    /// Needs an upgrade to take effect; the reload report names it with this label.
    Upgrade(&'static str),
}

impl Effect {
    /// Whether this is applied in place or needs an upgrade.
    pub fn reload(self) -> Reload {
        match self {
            Effect::Upgrade(_) => Reload::Upgrade,
            Effect::Backends
            | Effect::Queue
            | Effect::Settings
            | Effect::AccessLog
            | Effect::Certificate => Reload::InPlace,
        }
    }
}

/// One changed field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The field, named like its key in the file (`proxy.listen`, `backend.max_inflight`,
    /// `server` for the whole section).
    pub field: &'static str,
    /// What a reload does about it.
    pub effect: Effect,
}

/// Every field that differs between `old` and `new`, upgrade-only ones first (in the order the
/// reload report has always listed them).
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut field = |field: &'static str, changed: bool, effect: Effect| {
        if changed {
            changes.push(Change { field, effect });
        }
    };
    use Effect::*;
    // No `..`: a new field of `Config` fails to compile until it is classified below.
    let Config {
        listen,
        client_read_buffer_bytes,
        client_write_buffer_bytes,
        client_write_timeout,
        client_keepalive_timeout,
        max_header_bytes,
        max_body_bytes,
        max_connections,
        max_connections_per_ip,
        client_header_timeout,
        client_body_timeout,
        client_body_start_timeout,
        client_body_min_rate,
        max_buffered_body_bytes,
        request_timeout,
        max_queue,
        queue_timeout,
        retry_after,
        upstream,
        backends,
        server,
        health,
        admin_listen,
        admin_token,
        metrics_open,
        cluster,
        tls,
        access_log,
    } = old;
    let Upstream {
        connect_timeout,
        idle_timeout,
        read_timeout,
        write_timeout,
        ca_file,
        timeout_hold,
    } = upstream;
    let n = new;
    let nu = &new.upstream;
    let (tls_listen, tls_files) = tls_parts(tls.as_ref());
    let (new_tls_listen, new_tls_files) = tls_parts(n.tls.as_ref());

    field("proxy.listen", *listen != n.listen, Upgrade("proxy.listen"));
    field(
        "admin.listen",
        *admin_listen != n.admin_listen,
        Upgrade("admin.listen"),
    );
    field(
        "admin.token_file",
        *admin_token != n.admin_token,
        Upgrade("admin.token_file"),
    );
    field(
        "admin.metrics_open",
        *metrics_open != n.metrics_open,
        Upgrade("admin.metrics_open"),
    );
    field("cluster", *cluster != n.cluster, Upgrade("[cluster]"));
    field(
        "proxy.client_read_buffer_bytes",
        *client_read_buffer_bytes != n.client_read_buffer_bytes,
        Upgrade("proxy.client_read_buffer_bytes"),
    );
    field(
        "proxy.client_write_buffer_bytes",
        *client_write_buffer_bytes != n.client_write_buffer_bytes,
        Upgrade("proxy.client_write_buffer_bytes"),
    );
    field("server", *server != n.server, Upgrade("[server]"));
    field("health", *health != n.health, Upgrade("[health]"));
    field(
        "tls.listen",
        tls_listen != new_tls_listen,
        Upgrade("tls.listen"),
    );
    field(
        "upstream.ca_file",
        *ca_file != nu.ca_file,
        Upgrade("upstream.ca_file"),
    );

    field("backend", backends_differ(backends, &n.backends), Backends);
    field("admission.max_queue", *max_queue != n.max_queue, Queue);
    field(
        "admission.queue_timeout",
        *queue_timeout != n.queue_timeout,
        Queue,
    );
    for (name, changed) in [
        ("admission.retry_after", *retry_after != n.retry_after),
        (
            "proxy.client_write_timeout",
            *client_write_timeout != n.client_write_timeout,
        ),
        (
            "proxy.client_keepalive_timeout",
            *client_keepalive_timeout != n.client_keepalive_timeout,
        ),
        (
            "proxy.client_header_timeout",
            *client_header_timeout != n.client_header_timeout,
        ),
        (
            "proxy.client_body_timeout",
            *client_body_timeout != n.client_body_timeout,
        ),
        (
            "proxy.client_body_start_timeout",
            *client_body_start_timeout != n.client_body_start_timeout,
        ),
        (
            "proxy.client_body_min_rate",
            *client_body_min_rate != n.client_body_min_rate,
        ),
        (
            "proxy.max_buffered_body_bytes",
            *max_buffered_body_bytes != n.max_buffered_body_bytes,
        ),
        (
            "proxy.request_timeout",
            *request_timeout != n.request_timeout,
        ),
        (
            "proxy.max_connections",
            *max_connections != n.max_connections,
        ),
        (
            "proxy.max_connections_per_ip",
            *max_connections_per_ip != n.max_connections_per_ip,
        ),
        (
            "proxy.max_header_bytes",
            *max_header_bytes != n.max_header_bytes,
        ),
        ("proxy.max_body_bytes", *max_body_bytes != n.max_body_bytes),
        (
            "upstream.connect_timeout",
            *connect_timeout != nu.connect_timeout,
        ),
        ("upstream.idle_timeout", *idle_timeout != nu.idle_timeout),
        ("upstream.read_timeout", *read_timeout != nu.read_timeout),
        ("upstream.write_timeout", *write_timeout != nu.write_timeout),
        ("upstream.timeout_hold", *timeout_hold != nu.timeout_hold),
    ] {
        field(name, changed, Settings);
    }
    field("tls.cert", tls_files != new_tls_files, Certificate);
    field("log.access", *access_log != n.access_log, AccessLog);
    changes
}

/// The TLS listener's address, and its files.
fn tls_parts(t: Option<&TlsListener>) -> (Option<SocketAddr>, Option<(&Path, &Path)>) {
    match t {
        None => (None, None),
        Some(TlsListener { listen, cert, key }) => (Some(*listen), Some((cert, key))),
    }
}

/// Whether a backend was added, removed, or changed in any field (matched by name).
fn backends_differ(old: &[Backend], new: &[Backend]) -> bool {
    old.len() != new.len()
        || old.iter().any(|o| {
            // No `..`: a new field of `Backend` fails to compile until it is classified here.
            let Backend {
                name,
                address,
                addr,
                host,
                max_inflight,
                rate,
                slow_start,
                learning,
                tls,
            } = o;
            match new.iter().find(|b| b.name == *name) {
                None => true,
                Some(b) => {
                    *address != b.address
                        || *addr != b.addr
                        || *host != b.host
                        || *max_inflight != b.max_inflight
                        || *rate != b.rate
                        || *slow_start != b.slow_start
                        || *learning != b.learning
                        || *tls != b.tls
                }
            }
        })
}

#[cfg(test)]
mod tests {

    use super::super::file::{keys, Key, Reload};
    use super::super::resolve::NoIo;
    use super::super::Overrides;
    use super::*;

    /// The base file, section by section: a TLS backend (so its TLS keys can change) with a
    /// rate (so the burst applies), a TLS listener, and with `cluster`, a `[cluster]`.
    fn base(cluster: bool) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
        let s = |v: &str| v.to_string();
        let mut sections = vec![
            (
                "admission",
                vec![("max_inflight", s("16")), ("rate", s("100.0"))],
            ),
            (
                "tls",
                vec![
                    ("listen", s("\"127.0.0.1:8443\"")),
                    ("cert", s("\"/etc/sluice/tls/cert.pem\"")),
                    ("key", s("\"/etc/sluice/tls/key.pem\"")),
                ],
            ),
            (
                "backend",
                vec![
                    ("name", s("\"iis\"")),
                    ("address", s("\"127.0.0.1:9\"")),
                    ("tls", s("true")),
                ],
            ),
        ];
        if cluster {
            sections.push((
                "cluster",
                vec![
                    ("redis", s("\"redis://127.0.0.1:6379\"")),
                    ("id", s("\"store-a\"")),
                    ("instances", s("2")),
                    ("safe_share", s("4")),
                ],
            ));
        }
        sections
    }

    /// The base file with `key` set to its example value.
    fn file_with(key: Option<&Key>, cluster: bool) -> String {
        let mut sections = base(cluster);
        if let Some(k) = key {
            match sections.iter_mut().find(|(s, _)| *s == k.section) {
                Some((_, lines)) => match lines.iter_mut().find(|(f, _)| *f == k.field) {
                    Some(line) => line.1 = k.example.to_string(),
                    None => lines.push((k.field, k.example.to_string())),
                },
                None => sections.push((k.section, vec![(k.field, k.example.to_string())])),
            }
        }
        let mut text = String::new();
        for (section, lines) in sections {
            if section == "backend" {
                text.push_str("[[backend]]\n");
            } else {
                text.push_str(&format!("[{section}]\n"));
            }
            for (field, value) in lines {
                text.push_str(&format!("{field} = {value}\n"));
            }
        }
        text
    }

    fn load(text: &str) -> Config {
        Config::parse_with(text, None, &Overrides::default(), &NoIo)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Every key of the file, changed alone, is reported by the diff, and as the class the key
    /// declares: applied in place, or needing an upgrade. A key added to the file without
    /// reload handling fails here (its change is not seen, or seen as the other class).
    #[test]
    fn every_key_changed_alone_is_reported_as_its_class() {
        let all = keys();
        assert!(all.len() > 70, "{} keys", all.len());
        let mut in_place = 0;
        for key in &all {
            let cluster = key.section == "cluster";
            let old = load(&file_with(None, cluster));
            let new = load(&file_with(Some(key), cluster));
            let changes = diff(&old, &new);
            assert!(
                !changes.is_empty(),
                "{} changed to {} but the reload diff sees no change",
                key.name,
                key.example
            );
            for c in &changes {
                assert_eq!(
                    c.effect.reload(),
                    key.reload,
                    "{} changed to {}: the diff reports {c:?}, the key says {:?}",
                    key.name,
                    key.example,
                    key.reload
                );
            }
            for c in &changes {
                if let Effect::Upgrade(label) = c.effect {
                    // The report names the key itself, or its whole section.
                    assert!(
                        label == key.name || label == format!("[{}]", key.section),
                        "{}: reported as needing an upgrade under {label:?}",
                        key.name
                    );
                }
            }
            in_place += usize::from(key.reload == Reload::InPlace);
            assert!(
                diff(&new, &new).is_empty(),
                "{}: no change, no diff",
                key.name
            );
        }
        assert!(in_place > 0 && in_place < all.len());
    }

    #[test]
    fn every_key_is_named_once() {
        let all = keys();
        for (i, k) in all.iter().enumerate() {
            assert_eq!(k.name, format!("{}.{}", k.section, k.field));
            assert!(
                !all[..i].iter().any(|o| o.name == k.name),
                "{} twice",
                k.name
            );
        }
    }
}
