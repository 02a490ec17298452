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

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

const HEADER: usize = 16;

pub struct Wal {
    files: [File; 2],
    capacity: u64,
    pos: u64,
    epoch: u64,
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
            open_file(paths[0], capacity)?,
            open_file(paths[1], capacity)?,
        ];
        let mut records = Vec::new();
        for e in [epoch, epoch + 1] {
            // An epoch starts one file, the one `e % 2` names; a file written by a build that
            // kept the whole log in one file may hold any epoch, so both are read.
            for file in &files {
                let found = read_epoch(file, e)?;
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

    /// Whether `bytes` more framed bytes still fit before the end of the current file.
    pub fn fits(&self, bytes: usize) -> bool {
        self.pos + bytes as u64 <= self.capacity
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

    /// Writes framed records at the end of the current epoch and waits until they are on disk.
    pub fn append_durably(&mut self, framed: &[u8]) -> std::io::Result<()> {
        let file = &self.files[(self.epoch % 2) as usize];
        file.write_all_at(framed, self.pos)?;
        file.sync_data()?;
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
        let size = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let record_epoch = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if size == 0 || record_epoch != epoch || pos + HEADER as u64 + size > len {
            break;
        }
        let mut payload = vec![0u8; size as usize];
        file.read_exact_at(&mut payload, pos + HEADER as u64)?;
        if checksum(record_epoch, &payload) != crc {
            break;
        }
        records.push(payload);
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
        wal.append_durably(&framed).unwrap();
    }

    fn open(dir: &Path, epoch: u64) -> (Wal, Vec<Vec<u8>>) {
        let paths = [dir.join("log"), dir.join("log.1")];
        Wal::open([&paths[0], &paths[1]], 4096, epoch).unwrap()
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
                4096
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
}
