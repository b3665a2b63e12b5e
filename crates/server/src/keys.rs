//! API keys: `wrenn_` + 40 hex characters (or `e2b_` + 40 hex, the shape E2B's SDKs expect:
//! older ones check it before sending), stored as the SHA-256 of the whole key.
//! [`create`] is also how `wrenn keys create` makes the first key of an empty database.

use sha2::{Digest, Sha256};

use crate::db::{Db, DbError, now_ms};
use crate::ids;

/// A key just made: its id and the key itself (shown once, never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub key: String,
}

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key name must be 1 to 128 characters, got {0} characters")]
    BadName(usize),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the system random source failed: {0}")]
    Random(String),
}

/// The two shapes of a key; both work on both APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyShape {
    /// `wrenn_` + 40 hex.
    #[default]
    Wrenn,
    /// `e2b_` + 40 hex, for E2B's SDKs.
    E2b,
}

impl KeyShape {
    fn prefix(self) -> &'static str {
        match self {
            KeyShape::Wrenn => "wrenn_",
            KeyShape::E2b => "e2b_",
        }
    }
}

/// Makes a key named `name` in `db` and returns it.
pub async fn create(db: &Db, name: &str) -> Result<NewKey, KeyError> {
    create_shaped(db, name, KeyShape::Wrenn).await
}

/// Makes a key of `shape` named `name` in `db` and returns it.
pub async fn create_shaped(db: &Db, name: &str, shape: KeyShape) -> Result<NewKey, KeyError> {
    let length = name.chars().count();
    if length == 0 || length > 128 {
        return Err(KeyError::BadName(length));
    }
    let key = format!(
        "{}{}",
        shape.prefix(),
        ids::random_hex(20).map_err(KeyError::Random)?
    );
    let id = format!("key-{}", ids::random_hex(8).map_err(KeyError::Random)?);
    let prefix: String = key.chars().take(10).collect();
    let created_at = now_ms();
    db.insert_api_key(&id, name, &prefix, &hash(&key), created_at)
        .await?;
    Ok(NewKey {
        id,
        name: name.to_owned(),
        prefix,
        created_at,
        key,
    })
}

/// Connects to `database_url` (migrating it) and makes a key of `shape` there.
pub async fn create_at(
    database_url: &str,
    name: &str,
    shape: KeyShape,
) -> Result<NewKey, KeyError> {
    let db = Db::connect(database_url).await?;
    let key = create_shaped(&db, name, shape).await;
    db.close().await;
    key
}

/// The SHA-256 hex of a key, as stored.
pub fn hash(key: &str) -> String {
    ids::hex(&Sha256::digest(key.as_bytes()))
}

/// Whether `key` has the shape of an API key (`wrenn_` or `e2b_` and 40 lowercase hex).
pub fn well_formed(key: &str) -> bool {
    let rest = key
        .strip_prefix("wrenn_")
        .or_else(|| key.strip_prefix("e2b_"));
    rest.is_some_and(|hex| {
        hex.len() == 40
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(well_formed(&format!("wrenn_{}", "ab".repeat(20))));
        assert!(well_formed(&format!("e2b_{}", "0".repeat(40))));
        assert!(!well_formed(&format!("wrenn_{}", "AB".repeat(20))));
        assert!(!well_formed("wrenn_abc"));
        assert_eq!(hash("x").len(), 64);
    }
}
