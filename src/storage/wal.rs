//! The embedded store's write-ahead log: what makes a group of writes durable with one small
//! `fdatasync`, instead of one redb durable commit (several pages written and synced) per
//! group. The writer appends each group here and syncs it; an applier thread later applies it
//! to redb with non-durable commits. About once a second a durable redb commit (a checkpoint)
//! makes what the log holds redundant.
//!
//! The log is two files, and each epoch is written from the first byte of one of them: epoch
//! `e` in file `e % 2`. A checkpoint does not stop the writer: it moves on to the next epoch in
//! the other file at once, while the applier commits everything of the epoch before durably
//! and stores the new epoch in redb. That epoch's file is written again only after that
//! commit, two epochs later. So at any time the writes redb may lack are those of the epoch it
//! stores and of the one after, and recovery replays exactly those two, in order.
//!
//! Each file is filled with zeros to its full size when created, so a sync writes the data
//! blocks only (no size or block-allocation change to flush). Each record is
//! `len u32 | crc32 u32 | epoch u64 | payload`, the checksum over epoch and payload. An epoch's
//! records are read from the start of the file that holds them while their checksum holds and
//! their epoch is the one asked for: records of older epochs, left beyond the newest ones, are
//! never replayed.
//!
//! A group is written in whole blocks at a block boundary (`SyncFile`): where the filesystem
//! allows it, with direct I/O and `O_DSYNC`, one write that is durable when it returns, in
//! place of a write into the page cache and an `fdatasync` (on this project's disk about a
//! tenth less CPU per sync and a little less time, BENCHMARKS.md item 14). A padding record
//! (its `len` with the top bit set) fills the group's last block and is never replayed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const HEADER: usize = 16;
/// Writes are whole blocks at block-aligned offsets, as direct I/O asks.
pub const BLOCK: usize = 4096;
/// Set in `len` of a padding record.
const PADDING: u32 = 1 << 31;

pub struct Wal {
    files: [SyncFile; 2],
    capacity: u64,
    pos: u64,
    epoch: u64,
}

/// A file filled with zeros to its full size, written in whole blocks, each write durable once
/// it returns: through direct I/O with `O_DSYNC` where the filesystem takes it (ext4, xfs),
/// else a write and an `fdatasync` (tmpfs, for one).
pub struct SyncFile {
    /// Buffered: for reads, and for writes when `direct` is `None`.
    file: File,
    direct: Option<File>,
    /// Where a write is copied to be block-aligned in memory (`aligned`).
    buffer: Vec<u8>,
}

impl SyncFile {
    /// Opens `path`, creating it and filling it with zeros to `capacity` bytes if it is
    /// shorter.
    pub fn open(path: &Path, capacity: u64) -> std::io::Result<SyncFile> {
        let file = open_file(path, capacity)?;
        let mut buffer = Vec::new();
        // Some filesystems open with O_DIRECT and refuse the I/O: probe with a read.
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .ok()
            .filter(|direct| {
                capacity >= BLOCK as u64
                    && direct.read_exact_at(aligned(&mut buffer, BLOCK), 0).is_ok()
            });
        Ok(SyncFile {
            file,
            direct,
            buffer,
        })
    }

    /// Whether writes go through direct I/O with `O_DSYNC`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes `bytes` (whole blocks) at `at` (a block boundary) and returns once they are on
    /// disk.
    pub fn write_durably(&mut self, bytes: &[u8], at: u64) -> std::io::Result<()> {
        assert!(
            bytes.len().is_multiple_of(BLOCK) && at.is_multiple_of(BLOCK as u64),
            "whole blocks at a block boundary"
        );
        if let Some(direct) = &self.direct {
            let block = aligned(&mut self.buffer, bytes.len());
            block.copy_from_slice(bytes);
            match direct.write_all_at(block, at) {
                // A filesystem that read with direct I/O and will not write so: from now on
                // a write and a sync.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                done => return done,
            }
        }
        self.file.write_all_at(bytes, at)?;
        self.file.sync_data()
    }
}

/// `len` bytes of `buffer` starting at a block boundary in memory.
fn aligned(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len + BLOCK {
        buffer.resize(len + BLOCK, 0);
    }
    let start = buffer.as_ptr().align_offset(BLOCK);
    &mut buffer[start..start + len]
}

impl Wal {
    /// Opens (creating and zero-filling to `capacity` bytes if needed) the log's two files.
    /// Returns it with the payloads of epochs `epoch` and `epoch + 1` it holds, in order.
    /// Nothing can be appended until `restart` names the epoch to write.
    pub fn open(
        paths: [&Path; 2],
        capacity: u64,
        epoch: u64,
    ) -> std::io::Result<(Wal, Vec<Vec<u8>>)> {
        let files = [
            SyncFile::open(paths[0], capacity)?,
            SyncFile::open(paths[1], capacity)?,
        ];
        let mut records = Vec::new();
        for e in [epoch, epoch + 1] {
            // An epoch starts one file, the one `e % 2` names; a file written by a build that
            // kept the whole log in one file may hold any epoch, so both are read.
            for file in &files {
                let found = read_epoch(&file.file, e)?;
                if !found.is_empty() {
                    records.extend(found);
                    break;
                }
            }
        }
        Ok((
            Wal {
                files,
                capacity,
                pos: capacity,
                epoch,
            },
            records,
        ))
    }

    /// Whether `bytes` more framed bytes, with the padding of their last block, still fit
    /// before the end of the current file.
    pub fn fits(&self, bytes: usize) -> bool {
        self.pos + (bytes + padding(bytes)) as u64 <= self.capacity
    }

    /// Whether appends go through direct I/O with `O_DSYNC` (else a write and a sync).
    pub fn is_direct(&self) -> bool {
        self.files.iter().all(SyncFile::is_direct)
    }

    /// Whether anything was appended since the last `restart`.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Frames `payload` as one record of the current epoch, appended to `out`.
    pub fn frame(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&checksum(self.epoch, payload).to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(payload);
    }

    /// Writes framed records at the end of the current epoch, with a padding record to the
    /// end of their last block (added to `framed`), and waits until they are on disk.
    pub fn append_durably(&mut self, framed: &mut Vec<u8>) -> std::io::Result<()> {
        let pad = padding(framed.len());
        if pad > 0 {
            let zeros = pad - HEADER;
            let at = framed.len();
            framed.resize(at + pad, 0);
            framed[at..at + 4].copy_from_slice(&(zeros as u32 | PADDING).to_le_bytes());
            let crc = checksum(self.epoch, &framed[at + HEADER..]);
            framed[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            framed[at + 8..at + HEADER].copy_from_slice(&self.epoch.to_le_bytes());
        }
        self.files[(self.epoch % 2) as usize].write_durably(framed, self.pos)?;
        self.pos += framed.len() as u64;
        Ok(())
    }

    /// Later records go to `epoch`, from the start of its file. The caller makes sure redb
    /// durably holds whatever that file held (the epoch two before) before appending.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.pos = 0;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Bytes that take `len` bytes to a block boundary: none when they end at one, else at least
/// `at_least` (room for a padding record's header).
pub fn padding_to_block(len: usize, at_least: usize) -> usize {
    match len % BLOCK {
        0 => 0,
        used if BLOCK - used >= at_least => BLOCK - used,
        used => 2 * BLOCK - used,
    }
}

/// The padding record that ends a group of `len` framed bytes at a block boundary.
fn padding(len: usize) -> usize {
    padding_to_block(len, HEADER)
}

/// Opens one of the log's files, zero-filled to at least `capacity` bytes.
fn open_file(path: &Path, capacity: u64) -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let len = file.metadata()?.len();
    if len < capacity {
        let zeros = vec![0u8; 1 << 20];
        let mut at = len;
        while at < capacity {
            let n = (capacity - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.flush()?;
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(file)
}

/// The payloads of `epoch` at the start of `file`.
fn read_epoch(file: &File, epoch: u64) -> std::io::Result<Vec<Vec<u8>>> {
    let len = file.metadata()?.len();
    let mut records = Vec::new();
    let mut pos = 0u64;
    let mut header = [0u8; HEADER];
    while pos + HEADER as u64 <= len {
        file.read_exact_at(&mut header, pos)?;
        let raw = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let record_epoch = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let (size, pad) = ((raw & !PADDING) as u64, raw & PADDING != 0);
        if (size == 0 && !pad) || record_epoch != epoch || pos + HEADER as u64 + size > len {
            break;
        }
        let mut payload = vec![0u8; size as usize];
        file.read_exact_at(&mut payload, pos + HEADER as u64)?;
        if checksum(record_epoch, &payload) != crc {
            break;
        }
        if !pad {
            records.push(payload);
        }
        pos += HEADER as u64 + size;
    }
    Ok(records)
}

fn checksum(epoch: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(wal: &mut Wal, payloads: &[&[u8]]) {
        let mut framed = Vec::new();
        for p in payloads {
            wal.frame(p, &mut framed);
        }
        wal.append_durably(&mut framed).unwrap();
    }

    const CAPACITY: u64 = 4 * BLOCK as u64;

    fn open(dir: &Path, epoch: u64) -> (Wal, Vec<Vec<u8>>) {
        let paths = [dir.join("log"), dir.join("log.1")];
        Wal::open([&paths[0], &paths[1]], CAPACITY, epoch).unwrap()
    }

    fn texts(found: Vec<Vec<u8>>) -> Vec<String> {
        found
            .into_iter()
            .map(|p| String::from_utf8(p).unwrap())
            .collect()
    }

    #[test]
    fn records_of_the_current_epoch_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, found) = open(dir.path(), 7);
        assert!(found.is_empty());
        assert!(!wal.fits(1), "nothing is appended before a restart");
        for name in ["log", "log.1"] {
            assert_eq!(
                std::fs::metadata(dir.path().join(name)).unwrap().len(),
                CAPACITY
            );
        }
        wal.restart(7);
        append(&mut wal, &[b"one", b"two"]);
        append(&mut wal, &[b"three"]);
        drop(wal);
        assert_eq!(texts(open(dir.path(), 7).1), ["one", "two", "three"]);
    }

    #[test]
    fn epochs_alternate_between_the_files_and_two_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.restart(1);
        append(&mut wal, &[b"e1-a", b"e1-b", b"e1-c"]);
        // A checkpoint starts: epoch 2 goes to the other file while epoch 1 is committed.
        wal.restart(2);
        append(&mut wal, &[b"e2-a"]);
        drop(wal);
        // Before that commit redb still stores epoch 1: both epochs come back, in order.
        assert_eq!(
            texts(open(dir.path(), 1).1),
            ["e1-a", "e1-b", "e1-c", "e2-a"]
        );
        // After it, epoch 2 only.
        let (mut wal, found) = open(dir.path(), 2);
        assert_eq!(texts(found), ["e2-a"]);
        // Epoch 3 takes the first file again, over epoch 1's longer records.
        wal.restart(2);
        append(&mut wal, &[b"e2-a"]);
        wal.restart(3);
        append(&mut wal, &[b"e3-a"]);
        drop(wal);
        assert_eq!(texts(open(dir.path(), 2).1), ["e2-a", "e3-a"]);
        assert_eq!(texts(open(dir.path(), 3).1), ["e3-a"]);
        // Right after recovery moved to epoch 4 nothing is replayed.
        assert!(open(dir.path(), 4).1.is_empty());
    }

    #[test]
    fn a_log_kept_in_one_file_is_read_whatever_its_epoch() {
        let dir = tempfile::tempdir().unwrap();
        // An odd epoch at the start of the first file, as one file for every epoch left it.
        let (mut wal, _) = open(dir.path(), 5);
        wal.restart(5);
        let mut framed = Vec::new();
        wal.frame(b"kept", &mut framed);
        drop(wal);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("log"))
            .unwrap();
        file.write_all_at(&framed, 0).unwrap();
        assert_eq!(texts(open(dir.path(), 5).1), ["kept"]);
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.restart(1);
        append(&mut wal, &[b"whole", b"torn!"]);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("log.1"))
            .unwrap();
        // Corrupt the last byte of the second payload.
        file.write_all_at(b"?", (HEADER + 5 + HEADER + 4) as u64)
            .unwrap();
        assert_eq!(texts(open(dir.path(), 1).1), ["whole"]);
    }

    #[test]
    fn groups_start_at_block_boundaries_and_padding_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        wal.restart(1);
        // Leaves fewer bytes than a header in its block: the padding takes the next one too.
        let tight = vec![b'a'; BLOCK - 2 * HEADER - 8];
        let big = vec![b'b'; BLOCK + 100];
        append(&mut wal, &[b"first"]);
        assert_eq!(wal.pos, BLOCK as u64);
        append(&mut wal, &[&tight, b"x"]);
        assert_eq!(wal.pos, 3 * BLOCK as u64);
        assert!(!wal.fits(big.len()), "a group and its padding must fit");
        assert!(
            wal.fits(BLOCK),
            "a group filling its block needs no padding"
        );
        append(&mut wal, &[&vec![b'c'; BLOCK - HEADER]]);
        assert_eq!(wal.pos, CAPACITY);
        drop(wal);
        let found = open(dir.path(), 1).1;
        assert_eq!(found.len(), 4);
        assert_eq!(found[0], b"first");
        assert_eq!(found[1], tight);
        assert_eq!(found[2], b"x");
        assert_eq!(found[3], vec![b'c'; BLOCK - HEADER]);
    }

    #[test]
    fn without_direct_io_a_write_and_a_sync_keep_the_same_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 1);
        for file in &mut wal.files {
            file.direct = None;
        }
        assert!(!wal.is_direct());
        wal.restart(1);
        append(&mut wal, &[b"one", b"two"]);
        append(&mut wal, &[b"three"]);
        drop(wal);
        assert_eq!(texts(open(dir.path(), 1).1), ["one", "two", "three"]);
    }

    #[test]
    fn a_sync_file_writes_whole_blocks_where_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks");
        let mut file = SyncFile::open(&path, CAPACITY).unwrap();
        let mut block = vec![7u8; BLOCK];
        block[0] = 1;
        file.write_durably(&block, BLOCK as u64).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, CAPACITY);
        assert!(bytes[..BLOCK].iter().all(|&b| b == 0));
        assert_eq!(&bytes[BLOCK..2 * BLOCK], block.as_slice());
        assert!(bytes[2 * BLOCK..].iter().all(|&b| b == 0));
    }
}
