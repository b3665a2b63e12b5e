//! The sandbox's identity as files, where E2B's envd puts them for programs in the sandbox:
//! `/run/e2b/.E2B_SANDBOX_ID`, `.E2B_TEMPLATE_ID`, `.E2B_SANDBOX` (`true`). Written at start
//! and again whenever `/init` changes the ids.
use std::io;
use std::path::Path;

use crate::state::Settings;

/// Where the files go.
pub const DIR: &str = "/run/e2b";

/// Writes the metadata files — only when envd manages the system (a host running envd for
/// tests keeps its `/run`). Failures are logged.
pub fn publish(settings: &Settings) {
    if !settings.manage_system {
        return;
    }
    if let Err(error) = publish_in(Path::new(DIR), settings) {
        tracing::warn!(%error, "cannot write the sandbox metadata in {DIR}");
    }
}

/// Writes the metadata files into `dir` (created if missing); an unknown id leaves its file
/// alone.
pub fn publish_in(dir: &Path, settings: &Settings) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(".E2B_SANDBOX"), "true")?;
    if let Some(id) = &settings.sandbox_id {
        std::fs::write(dir.join(".E2B_SANDBOX_ID"), id)?;
    }
    if let Some(id) = &settings.template_id {
        std::fs::write(dir.join(".E2B_TEMPLATE_ID"), id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_publish_in_writes_known_ids_and_rewrites_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run/e2b");
        let mut settings = Settings {
            sandbox_id: Some("sbx-1".to_owned()),
            ..Settings::default()
        };
        publish_in(&run, &settings).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.join(".E2B_SANDBOX")).unwrap(),
            "true"
        );
        assert_eq!(
            std::fs::read_to_string(run.join(".E2B_SANDBOX_ID")).unwrap(),
            "sbx-1"
        );
        assert!(!run.join(".E2B_TEMPLATE_ID").exists());
        settings.sandbox_id = Some("sbx-2".to_owned());
        settings.template_id = Some("tpl".to_owned());
        publish_in(&run, &settings).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.join(".E2B_SANDBOX_ID")).unwrap(),
            "sbx-2"
        );
        assert_eq!(
            std::fs::read_to_string(run.join(".E2B_TEMPLATE_ID")).unwrap(),
            "tpl"
        );
    }

    #[test]
    fn test_publish_without_managing_writes_nothing() {
        // Must not touch the host's /run: nothing happens, even with ids set.
        let settings = Settings {
            sandbox_id: Some("never-written".to_owned()),
            ..Settings::default()
        };
        publish(&settings);
        let written = std::fs::read_to_string(Path::new(DIR).join(".E2B_SANDBOX_ID"));
        assert!(written.map_or(true, |id| id != "never-written"));
    }
}
