//! Globs for cluster ids, namespaces and service accounts: `*` matches any run of characters,
//! `?` one character; everything else matches itself.

/// A checked glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Checks a glob: non-empty, made of `a-z 0-9 - . _ * ?` (the characters of Kubernetes names).
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("empty glob".into());
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-._*?".contains(*c)))
        {
            return Err(format!("glob {pattern:?} has the character {c:?}"));
        }
        Ok(Glob(pattern.to_owned()))
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        let (p, t): (Vec<char>, Vec<char>) = (self.0.chars().collect(), text.chars().collect());
        let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some(pi);
                mark = ti;
                pi += 1;
            } else if let Some(s) = star {
                pi = s + 1;
                mark += 1;
                ti = mark;
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == '*' {
            pi += 1;
        }
        pi == p.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let cases = [
            ("*", "anything", true),
            ("*", "", true),
            ("foo", "foo", true),
            ("foo", "foobar", false),
            ("foo-*", "foo-bar", true),
            ("foo-*", "foo", false),
            ("*-prod", "payments-prod", true),
            ("*-prod", "payments-production", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("ns?", "ns1", true),
            ("ns?", "ns12", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                Glob::new(pattern).unwrap().matches(text),
                want,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn bad_globs() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("foo/bar").is_err());
        assert!(Glob::new("[a-z]").is_err());
        assert!(Glob::new("Ünï").is_err());
    }
}
