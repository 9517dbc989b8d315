//! SAN templates: `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`,
//! `{service_account}.{namespace}.svc`. Variables are checked when the policy loads; a template
//! that renders to an invalid name denies rather than issuing something malformed.

use crate::SpiffeId;

/// The variables a template may use.
pub const VARIABLES: [&str; 5] = [
    "trust_domain",
    "cluster",
    "namespace",
    "service_account",
    "pod",
];

/// The values of the variables for one request (`None`: unknown for this caller).
#[derive(Debug, Clone, Default)]
pub struct Vars<'a> {
    /// `{trust_domain}`.
    pub trust_domain: &'a str,
    /// `{cluster}`.
    pub cluster: Option<&'a str>,
    /// `{namespace}`.
    pub namespace: Option<&'a str>,
    /// `{service_account}`.
    pub service_account: Option<&'a str>,
    /// `{pod}`.
    pub pod: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(usize),
}

/// What a template renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanKind {
    /// A URI SAN (must be a valid SPIFFE ID).
    Uri,
    /// A DNS SAN (a hostname, no wildcard).
    Dns,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
    kind: SanKind,
}

impl Template {
    /// Parses a template; unknown variables and unbalanced braces are errors.
    pub fn parse(source: &str, kind: SanKind) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("template {source:?} has an unmatched '}}'"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("template {source:?} has an unclosed '{{'"))?
                + open;
            let name = &rest[open + 1..close];
            let index = VARIABLES.iter().position(|v| *v == name).ok_or_else(|| {
                format!(
                    "template {source:?} uses the unknown variable {{{name}}} (known: {})",
                    VARIABLES.map(|v| format!("{{{v}}}")).join(", ")
                )
            })?;
            parts.push(Part::Var(index));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("empty template".into());
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
            kind,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template, or says why the result is not a valid name.
    pub fn render(&self, vars: &Vars<'_>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(i) => {
                    let value = match *i {
                        0 => Some(vars.trust_domain),
                        1 => vars.cluster,
                        2 => vars.namespace,
                        3 => vars.service_account,
                        _ => vars.pod,
                    };
                    match value {
                        Some(v) if !v.is_empty() => {
                            if let Some(c) = v
                                .chars()
                                .find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c)))
                            {
                                return Err(format!(
                                    "{{{}}} holds the character {c:?}, which a name may not contain",
                                    VARIABLES[*i]
                                ));
                            }
                            out.push_str(v);
                        }
                        _ => {
                            return Err(format!(
                                "{{{}}} is not known for this caller",
                                VARIABLES[*i]
                            ));
                        }
                    }
                }
            }
        }
        match self.kind {
            SanKind::Uri => SpiffeId::parse(&out)
                .map(|id| id.to_string())
                .map_err(|e| e.to_string()),
            SanKind::Dns => valid_dns(&out).map(|()| out),
        }
    }
}

/// A DNS name as a SAN may hold it: labels of `a-z 0-9 -`, no wildcard, at most 253 bytes.
pub fn valid_dns(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a valid DNS name (length)"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} has an empty or over-long label"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?} has a label starting or ending with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "{name:?} holds {c:?}; DNS SANs hold only a-z, 0-9, '-' and '.'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            trust_domain: "cluster.local",
            cluster: Some("c1"),
            namespace: Some("foo"),
            service_account: Some("httpbin"),
            pod: None,
        }
    }

    #[test]
    fn renders_istio_identity() {
        let t = Template::parse(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
            SanKind::Uri,
        )
        .unwrap();
        assert_eq!(
            t.render(&vars()).unwrap(),
            "spiffe://cluster.local/ns/foo/sa/httpbin"
        );
        let d = Template::parse("{service_account}.{namespace}.svc", SanKind::Dns).unwrap();
        assert_eq!(d.render(&vars()).unwrap(), "httpbin.foo.svc");
    }

    #[test]
    fn refuses_unknown_variables_and_bad_braces() {
        assert!(
            Template::parse("spiffe://{td}/x", SanKind::Uri)
                .unwrap_err()
                .contains("unknown variable {td}")
        );
        assert!(Template::parse("spiffe://{namespace", SanKind::Uri).is_err());
        assert!(Template::parse("x}y", SanKind::Uri).is_err());
        assert!(Template::parse("", SanKind::Uri).is_err());
    }

    #[test]
    fn invalid_renderings_are_errors() {
        let pod = Template::parse("{pod}.{namespace}.svc", SanKind::Dns).unwrap();
        assert!(
            pod.render(&vars())
                .unwrap_err()
                .contains("{pod} is not known")
        );
        let wild = Template::parse("*.{namespace}.svc", SanKind::Dns).unwrap();
        assert!(wild.render(&vars()).is_err());
        let mut v = vars();
        v.namespace = Some("a/b");
        let t = Template::parse(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
            SanKind::Uri,
        )
        .unwrap();
        assert!(t.render(&v).is_err());
        v.namespace = Some("");
        assert!(t.render(&v).is_err());
        let upper = Template::parse("{service_account}.svc", SanKind::Dns).unwrap();
        v.service_account = Some("Bad");
        assert!(upper.render(&v).is_err());
    }
}
