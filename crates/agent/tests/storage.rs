//! Remote storage against a real layered store and a `file://` remote: an imported image
//! build, a template build (64 MiB Full memory, disk diff on the image) and a paused diff
//! build on top, uploaded from one store and fetched into another.

use std::fs;
use std::path::{Path, PathBuf};

use wrenn_agent::storage::{CHUNK_SIZE, RecordKind, Remote, Storage, StorageError};
use wrenn_snapshot::header::Header;
use wrenn_snapshot::{BuildId, DISK_BLOCK_SIZE, DiffWriter, DriveId, MEM_BLOCK_SIZE, Store};

const MEM_SIZE: u64 = 64 << 20;
const IMAGE_LEN: usize = 300_000;

/// Deterministic bytes that differ from block to block.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Chain {
    image: PathBuf,
    image_build: BuildId,
    template: BuildId,
    paused: BuildId,
}

/// Builds the three-build chain in `store` the way the agent lays it out.
fn make_chain(dir: &Path, store: &Store) -> Chain {
    let drive = DriveId::new("rootfs").unwrap();
    let image = dir.join("rootfs.ext4");
    fs::write(&image, pattern(1, IMAGE_LEN)).unwrap();
    let image_build = store.import_disk_image(&image, &drive).unwrap();
    let image_header = Header::read(&store.disk_header(image_build, &drive)).unwrap();

    // Template: Full memory (the first MiB zero, a hole), a disk diff over the image.
    let template = BuildId::random().unwrap();
    store.create_build_dir(template).unwrap();
    let mem = pattern(2, usize::try_from(MEM_SIZE).unwrap());
    let summary = wrenn_snapshot::write_full(
        &store.mem_data(template),
        |offset, buf| {
            let start = usize::try_from(offset).unwrap();
            if offset < 1 << 20 {
                buf.fill(0);
            } else {
                buf.copy_from_slice(&mem[start..start + buf.len()]);
            }
            Ok(())
        },
        MEM_SIZE,
        MEM_BLOCK_SIZE,
    )
    .unwrap();
    Header::full(template, MEM_SIZE, MEM_BLOCK_SIZE, &summary.zero_runs)
        .unwrap()
        .write(&store.mem_header(template))
        .unwrap();
    let block = usize::try_from(DISK_BLOCK_SIZE).unwrap();
    let mut disk = DiffWriter::create(&store.disk_data(template, &drive), DISK_BLOCK_SIZE).unwrap();
    disk.push(3, &pattern(3, block)).unwrap();
    disk.push(10, &pattern(4, block)).unwrap();
    let disk_summary = disk.finish().unwrap();
    let template_disk = image_header
        .apply_diff(template, &disk_summary.runs)
        .unwrap();
    template_disk
        .write(&store.disk_header(template, &drive))
        .unwrap();
    fs::write(store.vmstate(template), pattern(5, 20_000)).unwrap();
    fs::write(store.build_dir(template).join("prefetch"), b"0 1 2 3").unwrap();

    // Paused: a few dirty pages and one dirty disk block.
    let paused = BuildId::random().unwrap();
    store.create_build_dir(paused).unwrap();
    let page = usize::try_from(MEM_BLOCK_SIZE).unwrap();
    let mut mem_diff = DiffWriter::create(&store.mem_data(paused), MEM_BLOCK_SIZE).unwrap();
    for index in [0u64, 7, 8, 9, 5000] {
        mem_diff.push(index, &pattern(100 + index, page)).unwrap();
    }
    let mem_runs = mem_diff.finish().unwrap().runs;
    Header::read(&store.mem_header(template))
        .unwrap()
        .apply_diff(paused, &mem_runs)
        .unwrap()
        .write(&store.mem_header(paused))
        .unwrap();
    let mut disk = DiffWriter::create(&store.disk_data(paused, &drive), DISK_BLOCK_SIZE).unwrap();
    disk.push(20, &pattern(6, block)).unwrap();
    let runs = disk.finish().unwrap().runs;
    template_disk
        .apply_diff(paused, &runs)
        .unwrap()
        .write(&store.disk_header(paused, &drive))
        .unwrap();
    fs::write(store.vmstate(paused), pattern(7, 12_345)).unwrap();

    Chain {
        image,
        image_build,
        template,
        paused,
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    remote_dir: PathBuf,
    url: String,
    source: Store,
    chain: Chain,
    /// An empty second local store: the other host.
    other: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let source = Store::new(tmp.path().join("store-a"));
    let chain = make_chain(tmp.path(), &source);
    let remote_dir = tmp.path().join("remote");
    fs::create_dir(&remote_dir).unwrap();
    Setup {
        url: format!("file://{}/wrenn", remote_dir.display()),
        remote_dir: remote_dir.join("wrenn"),
        other: tmp.path().join("store-b"),
        source,
        chain,
        _tmp: tmp,
    }
}

fn storage(url: &str, local: &Path) -> Storage {
    Storage::new(&Remote::Url(url.to_owned()), local).unwrap()
}

/// Sorted (name, content) of every file in a build directory, symlinks followed.
fn build_files(store: &Store, build: BuildId) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(store.build_dir(build))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn leftovers(root: &Path) -> Vec<String> {
    fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_upload_then_ensure_elsewhere_is_byte_identical() {
    let s = setup();
    let chain = &s.chain;
    let up = storage(&s.url, s.source.root());
    assert!(up.is_remote());

    let report = up.upload_build(chain.paused).await.unwrap();
    let mut uploaded = report.uploaded.clone();
    uploaded.sort();
    let mut expected = vec![chain.paused, chain.template, chain.image_build];
    expected.sort();
    assert_eq!(uploaded, expected);
    assert!(report.skipped.is_empty());
    let mem_up = report
        .files
        .iter()
        .find(|f| f.build == chain.template && f.name == "memfile")
        .unwrap();
    assert_eq!(mem_up.bytes, MEM_SIZE);
    assert_eq!(mem_up.chunks, MEM_SIZE / CHUNK_SIZE);
    assert!(
        mem_up.chunks >= 4,
        "64 MiB went up in {} parts",
        mem_up.chunks
    );
    // The image went up as its content, not as a link.
    let image_object = s
        .remote_dir
        .join("builds")
        .join(chain.image_build.to_string())
        .join("disk-rootfs.data");
    assert_eq!(
        fs::read(&image_object).unwrap(),
        fs::read(&chain.image).unwrap()
    );

    // Idempotent: everything is skipped the second time.
    let again = up.upload_build(chain.paused).await.unwrap();
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!(again.skipped.len(), 3);
    assert!(again.files.is_empty());

    // The other host fetches the paused build and everything under it.
    let down = storage(&s.url, &s.other);
    let fetch = down.ensure_build(chain.paused).await.unwrap();
    let mut fetched = fetch.fetched.clone();
    fetched.sort();
    assert_eq!(fetched, expected);
    assert!(fetch.present.is_empty());
    let mem_down = fetch
        .files
        .iter()
        .find(|f| f.build == chain.template && f.name == "memfile")
        .unwrap();
    assert_eq!(mem_down.chunks, MEM_SIZE / CHUNK_SIZE);
    assert!(mem_down.chunks >= 4);
    assert_eq!(fetch.bytes(), report.bytes());

    let other = Store::new(&s.other);
    for build in &expected {
        assert_eq!(
            build_files(&s.source, *build),
            build_files(&other, *build),
            "build {build} differs"
        );
    }
    let drive = DriveId::new("rootfs").unwrap();
    let image_copy = other.disk_data(chain.image_build, &drive);
    let meta = fs::symlink_metadata(&image_copy).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the image is a regular file now"
    );
    assert_eq!(
        fs::read(&image_copy).unwrap(),
        fs::read(&chain.image).unwrap()
    );
    assert!(leftovers(&s.other).is_empty(), "{:?}", leftovers(&s.other));

    // A second ensure finds everything local and downloads nothing.
    let again = down.ensure_build(chain.paused).await.unwrap();
    assert!(again.fetched.is_empty());
    assert_eq!(again.present.len(), 3);
    assert!(again.files.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ensure_of_build_not_in_remote_is_clear_error() {
    let s = setup();
    let down = storage(&s.url, &s.other);
    let missing = BuildId::random().unwrap();
    let err = down.ensure_build(missing).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::NotInRemote { build, .. } if *build == missing),
        "{err}"
    );
    assert!(err.to_string().contains(&missing.to_string()), "{err}");
    assert!(!Store::new(&s.other).build_dir(missing).exists());
    assert!(leftovers(&s.other).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failed_download_leaves_no_half_build() {
    let s = setup();
    let chain = &s.chain;
    storage(&s.url, s.source.root())
        .upload_build(chain.paused)
        .await
        .unwrap();
    // Lose one object of the template build: its manifest still lists it.
    fs::remove_file(
        s.remote_dir
            .join("builds")
            .join(chain.template.to_string())
            .join("memfile"),
    )
    .unwrap();

    let down = storage(&s.url, &s.other);
    let err = down.ensure_build(chain.template).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Remote { object, .. } if object.ends_with("memfile")),
        "{err}"
    );
    let other = Store::new(&s.other);
    assert!(!other.build_dir(chain.template).exists());
    assert!(leftovers(&s.other).is_empty(), "{:?}", leftovers(&s.other));

    // The paused build on top fails the same way, and leaves no template build either.
    assert!(down.ensure_build(chain.paused).await.is_err());
    assert!(!other.build_dir(chain.template).exists());
    assert!(leftovers(&s.other).is_empty(), "{:?}", leftovers(&s.other));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delete_build_removes_it_from_remote() {
    let s = setup();
    let chain = &s.chain;
    let up = storage(&s.url, s.source.root());
    up.upload_build(chain.image_build).await.unwrap();
    up.delete_build(chain.image_build).await.unwrap();
    let err = storage(&s.url, &s.other)
        .ensure_build(chain.image_build)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotInRemote { .. }), "{err}");
    let dir = s
        .remote_dir
        .join("builds")
        .join(chain.image_build.to_string());
    let left: Vec<_> = fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // Deleting again, or a build never uploaded, is fine; the local build stays.
    up.delete_build(chain.image_build).await.unwrap();
    assert!(s.source.build_dir(chain.image_build).exists());
    // And an upload after a delete goes up again.
    let report = up.upload_build(chain.image_build).await.unwrap();
    assert_eq!(report.uploaded, vec![chain.image_build]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_records_round_trip_and_list() {
    let s = setup();
    let a = storage(&s.url, s.source.root());
    let b = storage(&s.url, &s.other);
    assert!(
        a.list_records(RecordKind::Template)
            .await
            .unwrap()
            .is_empty()
    );

    a.put_record(RecordKind::Template, "python", br#"{"name":"python"}"#)
        .await
        .unwrap();
    a.put_record(RecordKind::Template, "base", br#"{"name":"base"}"#)
        .await
        .unwrap();
    a.put_record(RecordKind::Sandbox, "sb-1", br#"{"id":"sb-1"}"#)
        .await
        .unwrap();

    assert_eq!(
        b.list_records(RecordKind::Template).await.unwrap(),
        vec!["base".to_owned(), "python".to_owned()]
    );
    assert_eq!(
        b.list_records(RecordKind::Sandbox).await.unwrap(),
        vec!["sb-1".to_owned()]
    );
    assert_eq!(
        b.get_record(RecordKind::Sandbox, "sb-1").await.unwrap(),
        Some(br#"{"id":"sb-1"}"#.to_vec())
    );
    assert_eq!(
        b.get_record(RecordKind::Sandbox, "python").await.unwrap(),
        None
    );

    // Overwrite, delete, delete again.
    a.put_record(RecordKind::Template, "base", b"{}")
        .await
        .unwrap();
    assert_eq!(
        b.get_record(RecordKind::Template, "base").await.unwrap(),
        Some(b"{}".to_vec())
    );
    b.delete_record(RecordKind::Template, "base").await.unwrap();
    b.delete_record(RecordKind::Template, "base").await.unwrap();
    assert_eq!(
        a.list_records(RecordKind::Template).await.unwrap(),
        vec!["python".to_owned()]
    );

    for bad in ["", "../x", "a/b", ".hidden"] {
        let err = a
            .put_record(RecordKind::Template, bad, b"{}")
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::BadRecordName { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_remote_none_does_nothing() {
    let s = setup();
    let chain = &s.chain;
    let local = Storage::new(&Remote::None, s.source.root()).unwrap();
    assert!(!local.is_remote());
    let before = build_files(&s.source, chain.paused);

    let report = local.upload_build(chain.paused).await.unwrap();
    assert!(report.uploaded.is_empty() && report.skipped.is_empty() && report.files.is_empty());
    let fetch = local
        .ensure_build(BuildId::random().unwrap())
        .await
        .unwrap();
    assert!(fetch.fetched.is_empty() && fetch.files.is_empty());
    local.delete_build(chain.paused).await.unwrap();
    local
        .put_record(RecordKind::Template, "base", b"{}")
        .await
        .unwrap();
    assert_eq!(
        local
            .get_record(RecordKind::Template, "base")
            .await
            .unwrap(),
        None
    );
    assert!(
        local
            .list_records(RecordKind::Template)
            .await
            .unwrap()
            .is_empty()
    );
    local
        .delete_record(RecordKind::Template, "base")
        .await
        .unwrap();

    assert!(!s.remote_dir.exists(), "nothing was written to the remote");
    assert_eq!(build_files(&s.source, chain.paused), before);
}
