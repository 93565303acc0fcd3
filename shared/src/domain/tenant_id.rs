//! The tenant id: the one name a tenant has at every boundary (path segment, store key, URL).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest tenant id accepted.
pub const MAX_TENANT_ID_LEN: usize = 64;

/// A validated tenant id: `[A-Za-z0-9_-]{1,64}`.
///
/// It becomes a directory name, a document id and a table key, so nothing else is ever accepted:
/// no dots (`..`), no separators, no percent-encodings, no unicode look-alikes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// Why a string is not a tenant id. The offending input is never echoed back (it may be hostile).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantIdError {
    /// The input was empty.
    #[error("tenant id is empty")]
    Empty,
    /// The input was longer than 64 bytes.
    #[error("tenant id is longer than {MAX_TENANT_ID_LEN} characters")]
    TooLong,
    /// The input held a character outside `[A-Za-z0-9_-]`.
    #[error("tenant id may contain only A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter,
}

impl TenantId {
    /// Parses and validates a tenant id.
    pub fn parse(s: &str) -> Result<Self, TenantIdError> {
        if s.is_empty() {
            return Err(TenantIdError::Empty);
        }
        if s.len() > MAX_TENANT_ID_LEN {
            return Err(TenantIdError::TooLong);
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(TenantIdError::BadCharacter);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Shard of this tenant among `shards` hosts (FNV-1a, stable across processes and releases).
    pub fn shard(&self, shards: u32) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(shards.max(1))) as u32
    }
}

impl FromStr for TenantId {
    type Err = TenantIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for TenantId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TenantId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The OpenAPI schema of a tenant id: the same alphabet and length as [`TenantId::parse`].
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for TenantId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_-]{1,64}$"))
            .min_length(Some(1))
            .max_length(Some(MAX_TENANT_ID_LEN))
            .description(Some("A tenant id: 1 to 64 of A-Z, a-z, 0-9, `_` and `-`."))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for TenantId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["a", "Z", "0", "_", "-", "restaurant-42_main", &"x".repeat(64)] {
            assert_eq!(TenantId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_else() {
        let long = "x".repeat(65);
        let cases: &[(&str, TenantIdError)] = &[
            ("", TenantIdError::Empty),
            (&long, TenantIdError::TooLong),
            ("..", TenantIdError::BadCharacter),
            (".", TenantIdError::BadCharacter),
            ("a/b", TenantIdError::BadCharacter),
            ("a\\b", TenantIdError::BadCharacter),
            ("%2e%2e", TenantIdError::BadCharacter),
            ("a%2Fb", TenantIdError::BadCharacter),
            ("a\0b", TenantIdError::BadCharacter),
            ("a b", TenantIdError::BadCharacter),
            ("tenant\n", TenantIdError::BadCharacter),
            // Cyrillic 'а' (U+0430) looks like Latin 'a'.
            ("\u{0430}bc", TenantIdError::BadCharacter),
            // Fullwidth digits and letters.
            ("\u{FF11}\u{FF12}", TenantIdError::BadCharacter),
            ("caf\u{e9}", TenantIdError::BadCharacter),
        ];
        for (input, want) in cases {
            assert_eq!(TenantId::parse(input).unwrap_err(), *want, "input {input:?}");
        }
    }

    #[test]
    fn error_never_echoes_the_input() {
        let err = TenantId::parse("../../etc/passwd").unwrap_err().to_string();
        assert!(!err.contains("passwd"));
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<TenantId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<TenantId>("\"../x\"").is_err());
    }

    #[test]
    fn shard_is_stable_and_in_range() {
        let t = TenantId::parse("tenant-1").unwrap();
        assert_eq!(t.shard(1), 0);
        let s = t.shard(7);
        assert!(s < 7);
        assert_eq!(s, t.shard(7));
    }

    proptest::proptest! {
        #[test]
        fn parse_agrees_with_the_grammar(s in "\\PC{0,70}") {
            let valid = !s.is_empty() && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            proptest::prop_assert_eq!(TenantId::parse(&s).is_ok(), valid);
        }
    }
}
