//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), checked to the SPIFFE ID specification.

use std::fmt;

/// A valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a string is not a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {id:?}: {reason}")]
pub struct SpiffeIdError {
    id: String,
    reason: &'static str,
}

const MAX_LEN: usize = 2048;

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason| SpiffeIdError {
            id: id.chars().take(200).collect(),
            reason,
        };
        if id.len() > MAX_LEN {
            return Err(err("longer than 2048 bytes"));
        }
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("scheme must be spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(err("empty trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(err("trust domain may hold only a-z, 0-9, '-', '.', '_'"));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(err("empty path segment"));
                }
                if segment == "." || segment == ".." {
                    return Err(err("path segment '.' or '..'"));
                }
                if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(err("path may hold only A-Z, a-z, 0-9, '-', '.', '_'"));
                }
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The Istio workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/` (empty for a trust domain ID).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// For an Istio workload ID `/ns/<ns>/sa/<sa>`, the namespace and service account.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let parts: Vec<&str> = self.path.split('/').collect();
        match parts.as_slice() {
            ["", "ns", ns, "sa", sa] => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_istio_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/httpbin").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_service_account(), Some(("foo", "httpbin")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/httpbin");
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a?x=1",
            "spiffe://cluster.local/ns/*/sa/b",
            "spiffe://user@cluster.local/ns/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
