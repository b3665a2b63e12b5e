//! [`BuildId`]: the name of one build (one generation of a sandbox's state).
//!
//! Sixteen random bytes, printed as 32 lowercase hex characters. The all-zero id is reserved:
//! in a header it means "these bytes are zeros", so [`BuildId::random`] never returns it.
//!
//! Serde: as the hex string in human-readable formats (JSON in APIs and logs), as the 16 raw
//! bytes in binary formats (postcard headers, where the string would double the size).

use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors from parsing or generating a [`BuildId`].
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("build id {text:?} is not 32 lowercase hex characters")]
    Malformed { text: String },
    #[error("the operating system's random source failed: {reason}")]
    Random { reason: String },
}

/// The id of one build. See the module doc.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BuildId([u8; 16]);

impl BuildId {
    /// The reserved id: "read as zeros, never fetched".
    pub const ZERO: BuildId = BuildId([0; 16]);

    /// A fresh random, non-zero id.
    pub fn random() -> Result<BuildId, IdError> {
        loop {
            let mut bytes = [0u8; 16];
            getrandom::fill(&mut bytes).map_err(|e| IdError::Random {
                reason: e.to_string(),
            })?;
            let id = BuildId(bytes);
            // Astronomically unlikely, but ZERO must never name real data.
            if !id.is_zero() {
                return Ok(id);
            }
        }
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> BuildId {
        BuildId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        *self == BuildId::ZERO
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildId({self})")
    }
}

impl FromStr for BuildId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<BuildId, IdError> {
        let malformed = || IdError::Malformed {
            text: text.chars().take(64).collect(),
        };
        let digits = text.as_bytes();
        if digits.len() != 32 {
            return Err(malformed());
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let high = hex_digit(pair[0]).ok_or_else(malformed)?;
            let low = hex_digit(pair[1]).ok_or_else(malformed)?;
            *byte = (high << 4) | low;
        }
        Ok(BuildId(bytes))
    }
}

/// Lowercase only, so every id has exactly one spelling (directory names compare as strings).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Serialize for BuildId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for BuildId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BuildId, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(D::Error::custom)
        } else {
            <[u8; 16]>::deserialize(deserializer).map(BuildId)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_build_id_display_parse_round_trips() {
        let id = BuildId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<BuildId>().unwrap(), id);
    }

    #[test]
    fn test_build_id_random_is_not_zero() {
        for _ in 0..100 {
            assert!(!BuildId::random().unwrap().is_zero());
        }
    }

    #[test]
    fn test_build_id_zero_displays_as_zeros() {
        assert_eq!(BuildId::ZERO.to_string(), "0".repeat(32));
        assert!(BuildId::ZERO.is_zero());
    }

    #[test]
    fn test_build_id_parse_uppercase_rejected() {
        let err = "0123456789ABCDEF0123456789abcdef".parse::<BuildId>();
        assert!(matches!(err, Err(IdError::Malformed { .. })));
    }

    #[test]
    fn test_build_id_parse_wrong_length_rejected() {
        assert!("abc".parse::<BuildId>().is_err());
        assert!("0".repeat(33).parse::<BuildId>().is_err());
        assert!("".parse::<BuildId>().is_err());
    }

    #[test]
    fn test_build_id_parse_non_hex_rejected() {
        assert!("g".repeat(32).parse::<BuildId>().is_err());
        // 32 bytes but multi-byte characters: must not be split mid-character.
        assert!("é".repeat(16).parse::<BuildId>().is_err());
    }

    #[test]
    fn test_build_id_serde_json_is_hex_string() {
        let id = BuildId::from_bytes([0xab; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<BuildId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BuildId>("\"xyz\"").is_err());
    }

    #[test]
    fn test_build_id_serde_postcard_is_raw_bytes() {
        let id = BuildId::from_bytes([7; 16]);
        let bytes = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bytes, vec![7u8; 16]);
        assert_eq!(postcard::from_bytes::<BuildId>(&bytes).unwrap(), id);
    }

    proptest! {
        #[test]
        fn test_build_id_parse_random_text_never_panics(text in ".{0,40}") {
            if let Ok(id) = text.parse::<BuildId>() {
                prop_assert_eq!(id.to_string(), text);
            }
        }
    }
}
