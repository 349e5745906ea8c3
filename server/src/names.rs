//! Repository names, tags and manifest references, parsed and validated once
//! at the edge (distribution-spec v1.1 grammar).

use crate::error::ApiError;
use orlop_engine::Digest;
use std::fmt;

/// Longest repository name accepted (clients cap host + name at 255).
pub const REPO_NAME_BYTES_MAX: usize = 255;
/// Longest tag (the spec's pattern allows 128 characters).
pub const TAG_BYTES_MAX: usize = 128;

/// A repository name such as `library/debian`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::NameInvalid(format!("{s:?}: {why}"));
        if s.is_empty() || s.len() > REPO_NAME_BYTES_MAX {
            return Err(bad("length must be 1 to 255"));
        }
        for comp in s.split('/') {
            if !valid_component(comp.as_bytes()) {
                return Err(bad(
                    "each path component is lowercase alphanumerics joined by '.', '_', '__' or dashes",
                ));
            }
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &[u8]) -> bool {
    let mut i = 0;
    loop {
        let start = i;
        while i < c.len() && is_alnum(c[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == c.len() {
            return true;
        }
        let sep_start = i;
        while i < c.len() && !is_alnum(c[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|b| *b == b'-');
        if !ok {
            return false;
        }
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > TAG_BYTES_MAX {
            return Err(ApiError::TagInvalid(s.chars().take(200).collect()));
        }
        Ok(Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        if s.contains(':') {
            parse_digest(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Parses a digest from the network, mapping failure to DIGEST_INVALID.
pub fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>()
        .map_err(|e| ApiError::DigestInvalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for good in [
            "a",
            "library/debian",
            "a.b_c__d---e/f0",
            "x/y/z",
            "0",
            "foo-bar",
        ] {
            assert!(RepoName::parse(good).is_ok(), "{good}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "a.-b",
            "a b",
            "a:b",
            long.as_str(),
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for good in ["latest", "v1.0.0-rc_1", "_x", "A"] {
            assert!(Tag::parse(good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in ["", ".x", "-x", "a/b", "a:b", long.as_str()] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        let d = Digest::sha256_of(b"x").to_string();
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(matches!(
            Reference::parse("sha256:xyz"),
            Err(ApiError::DigestInvalid(_))
        ));
    }
}
