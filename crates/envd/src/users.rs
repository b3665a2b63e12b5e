//! Users and groups from `/etc/passwd` and `/etc/group`, read on each lookup (they are small,
//! and a `useradd` inside the sandbox must count at once). envd is linked statically, where
//! glibc's NSS lookups (`getpwnam`) would need shared libraries at run time; reading the files
//! is what the sandbox images need.
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors looking users up.
#[derive(Debug, Error)]
pub enum UserError {
    /// No such user in the passwd file.
    #[error("invalid username: '{0}'")]
    UnknownUser(String),
    /// The passwd or group file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An account a process or file operation runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
    /// Supplementary groups (from the group file), the primary one included.
    pub groups: Vec<u32>,
}

/// Where accounts are read from; [`UserDb::system`] in production.
#[derive(Debug, Clone)]
pub struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

impl UserDb {
    /// `/etc/passwd` and `/etc/group`.
    pub fn system() -> Self {
        Self::at("/etc/passwd", "/etc/group")
    }

    /// Other files (tests).
    pub fn at(passwd: impl Into<PathBuf>, group: impl Into<PathBuf>) -> Self {
        Self {
            passwd: passwd.into(),
            group: group.into(),
        }
    }

    /// The user called `name`.
    pub fn lookup(&self, name: &str) -> Result<User, UserError> {
        let passwd = read(&self.passwd)?;
        let mut user = parse_passwd(&passwd)
            .find(|user| user.name == name)
            .ok_or_else(|| UserError::UnknownUser(name.to_owned()))?;
        // A missing group file only loses supplementary groups.
        let groups = read(&self.group).unwrap_or_default();
        user.groups = member_groups(&groups, &user.name, user.gid);
        Ok(user)
    }

    /// The user with id `uid`, if any.
    pub fn by_uid(&self, uid: u32) -> Option<User> {
        let passwd = read(&self.passwd).ok()?;
        let mut user = parse_passwd(&passwd).find(|user| user.uid == uid)?;
        let groups = read(&self.group).unwrap_or_default();
        user.groups = member_groups(&groups, &user.name, user.gid);
        Some(user)
    }

    /// The name of user `uid` (its number when it has no entry).
    pub fn user_name(&self, uid: u32) -> String {
        read(&self.passwd)
            .ok()
            .and_then(|passwd| {
                parse_passwd(&passwd)
                    .find(|user| user.uid == uid)
                    .map(|u| u.name)
            })
            .unwrap_or_else(|| uid.to_string())
    }

    /// The name of group `gid` (its number when it has no entry).
    pub fn group_name(&self, gid: u32) -> String {
        read(&self.group)
            .ok()
            .and_then(|groups| {
                groups.lines().find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let id = fields.nth(1)?.parse::<u32>().ok()?;
                    (id == gid).then(|| name.to_owned())
                })
            })
            .unwrap_or_else(|| gid.to_string())
    }
}

fn read(path: &Path) -> Result<String, UserError> {
    std::fs::read_to_string(path).map_err(|source| UserError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The well-formed entries of a passwd file (`name:x:uid:gid:gecos:home:shell`).
fn parse_passwd(text: &str) -> impl Iterator<Item = User> + '_ {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0].is_empty() || line.starts_with('#') {
            return None;
        }
        Some(User {
            name: fields[0].to_owned(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: PathBuf::from(fields[5]),
            shell: PathBuf::from(if fields[6].is_empty() {
                "/bin/sh"
            } else {
                fields[6]
            }),
            groups: Vec::new(),
        })
    })
}

/// `primary` plus every group of the group file (`name:x:gid:members`) listing `user`.
fn member_groups(text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|member| member.trim() == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(passwd: &str, group: &str) -> (tempfile::TempDir, UserDb) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("group"), group).unwrap();
        let db = UserDb::at(dir.path().join("passwd"), dir.path().join("group"));
        (dir, db)
    }

    #[test]
    fn finds_users_with_their_groups() {
        let (_dir, db) = db(
            "root:x:0:0:root:/root:/bin/bash\nbroken line\nuser:x:1000:1000::/home/user:\n",
            "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\ndocker:x:999:other\n",
        );
        let user = db.lookup("user").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 1000));
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(user.shell, PathBuf::from("/bin/sh"));
        assert_eq!(user.groups, vec![1000, 27]);
        assert_eq!(db.lookup("root").unwrap().groups, vec![0]);
        assert_eq!(db.user_name(1000), "user");
        assert_eq!(db.group_name(27), "sudo");
        assert_eq!(db.group_name(4242), "4242");
        assert_eq!(db.by_uid(0).unwrap().name, "root");
    }

    #[test]
    fn unknown_users_are_named_in_the_error() {
        let (_dir, db) = db("root:x:0:0:root:/root:/bin/bash\n", "");
        let error = db.lookup("nobody-here").unwrap_err();
        assert_eq!(error.to_string(), "invalid username: 'nobody-here'");
    }
}
