//! Templates: named frozen states that sandboxes start from.
//!
//! A template is a build of the snapshot store (its memory, its disk and its VM state) plus the
//! machine shape baked into it: a sandbox from it gets exactly those vCPUs and that memory. One
//! JSON file per template under `<data>/templates/`, written atomically; the set is loaded at
//! start and kept in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// Errors of the template records.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "template name {0:?} is invalid: use 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("no template named {0:?}")]
    NotFound(String),
    #[error("a template named {0:?} exists already (delete it first, or build with replace)")]
    Exists(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template file {} is damaged: {source}", path.display())]
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    /// The store build a sandbox restores from.
    pub build_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Unix time in milliseconds.
    pub created_at_ms: u64,
    /// The sandbox it was taken from; `None` for a template built from an image.
    pub source_sandbox_id: Option<String>,
    /// The access token the frozen envd holds (a template taken from a sandbox): a new
    /// sandbox's `/init` must present it.
    pub envd_access_token: Option<String>,
}

/// Checks a template name: it becomes a file name.
pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(TemplateError::InvalidName(name.to_owned()))
    }
}

/// The templates of one agent.
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
    templates: RwLock<BTreeMap<String, Template>>,
}

impl TemplateStore {
    /// Loads every template under `dir` (created when missing).
    pub fn open(dir: &Path) -> Result<TemplateStore, TemplateError> {
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| TemplateError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut templates = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
            let path = entry.map_err(io("reading", dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(io("reading", &path))?;
            let template: Template = serde_json::from_slice(&text)
                .map_err(|source| TemplateError::Damaged { path, source })?;
            templates.insert(template.name.clone(), template);
        }
        Ok(TemplateStore {
            dir: dir.to_owned(),
            templates: RwLock::new(templates),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub fn get(&self, name: &str) -> Result<Template, TemplateError> {
        self.read()
            .get(name)
            .cloned()
            .ok_or_else(|| TemplateError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Vec<Template> {
        self.read().values().cloned().collect()
    }

    /// Records a template; with `replace` an existing one of that name is returned (its
    /// build is the caller's to release).
    pub fn insert(
        &self,
        template: Template,
        replace: bool,
    ) -> Result<Option<Template>, TemplateError> {
        validate_name(&template.name)?;
        let mut templates = self.write();
        if !replace && templates.contains_key(&template.name) {
            return Err(TemplateError::Exists(template.name));
        }
        let path = self.path(&template.name);
        let tmp = path.with_extension("json.tmp");
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| TemplateError::Io { op, path, source }
        };
        let text =
            serde_json::to_vec_pretty(&template).map_err(|source| TemplateError::Damaged {
                path: path.clone(),
                source,
            })?;
        std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
        Ok(templates.insert(template.name.clone(), template))
    }

    /// Forgets a template and removes its file.
    pub fn remove(&self, name: &str) -> Result<Template, TemplateError> {
        let mut templates = self.write();
        let template = templates
            .remove(name)
            .ok_or_else(|| TemplateError::NotFound(name.to_owned()))?;
        let path = self.path(name);
        if let Err(source) = std::fs::remove_file(&path) {
            templates.insert(name.to_owned(), template);
            return Err(TemplateError::Io {
                op: "removing",
                path,
                source,
            });
        }
        Ok(template)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Template>> {
        self.templates
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Template>> {
        self.templates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str) -> Template {
        Template {
            name: name.into(),
            build_id: "00112233445566778899aabbccddeeff".into(),
            vcpus: 1,
            memory_mib: 256,
            created_at_ms: 1,
            source_sandbox_id: None,
            envd_access_token: None,
        }
    }

    #[test]
    fn test_names_are_checked() {
        for good in ["base", "py-3.12", "a", "x_1"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-a", ".a", "A", "a/b", "a b", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_insert_get_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(dir.path()).unwrap();
        store.insert(template("base"), false).unwrap();
        assert!(matches!(
            store.insert(template("base"), false),
            Err(TemplateError::Exists(_))
        ));
        let replaced = store.insert(template("base"), true).unwrap();
        assert_eq!(replaced, Some(template("base")));
        let reopened = TemplateStore::open(dir.path()).unwrap();
        assert_eq!(reopened.get("base").unwrap(), template("base"));
        reopened.remove("base").unwrap();
        assert!(matches!(
            reopened.get("base"),
            Err(TemplateError::NotFound(_))
        ));
        assert!(TemplateStore::open(dir.path()).unwrap().list().is_empty());
    }

    #[test]
    fn test_damaged_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), b"{").unwrap();
        let err = TemplateStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("x.json"), "{err}");
    }
}
