//! The embedded store's write-ahead log: what makes a group of writes durable with one small
//! `fdatasync`, instead of one redb durable commit (several pages written and synced) per
//! group. The writer appends each group here and syncs it, then applies it to redb with a
//! non-durable commit (visible to readers at once); a durable redb commit (a checkpoint)
//! every second or so makes the log's content redundant, and the log starts again from its
//! first byte under a new epoch.
//!
//! The file is filled with zeros to its full size when created, so a sync writes the data
//! blocks only (no size or block-allocation change to flush). Each record is
//! `len u32 | crc32 u32 | epoch u64 | payload`, the checksum over epoch and payload. At open,
//! records are read from the start while their checksum holds and their epoch is the one the
//! last checkpoint stored in redb: records of older epochs, left beyond the newest ones, are
//! never replayed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

const HEADER: usize = 16;

pub struct Wal {
    file: File,
    capacity: u64,
    pos: u64,
    epoch: u64,
}

impl Wal {
    /// Opens (creating and zero-filling to `capacity` bytes if needed) the log at `path`.
    /// Returns it with the payloads of `epoch` it holds, in order; appends then go after them.
    pub fn open(path: &Path, capacity: u64, epoch: u64) -> std::io::Result<(Wal, Vec<Vec<u8>>)> {
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
        let capacity = capacity.max(len);
        let mut records = Vec::new();
        let mut pos = 0u64;
        let mut header = [0u8; HEADER];
        while pos + HEADER as u64 <= capacity {
            file.read_exact_at(&mut header, pos)?;
            let size = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let record_epoch = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            if size == 0 || record_epoch != epoch || pos + HEADER as u64 + size > capacity {
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
        Ok((
            Wal {
                file,
                capacity,
                pos,
                epoch,
            },
            records,
        ))
    }

    /// Whether `bytes` more framed bytes still fit before the end of the file.
    pub fn fits(&self, bytes: usize) -> bool {
        self.pos + bytes as u64 <= self.capacity
    }

    /// Whether anything was appended since the last checkpoint.
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

    /// Writes framed records at the end of the log and waits until they are on disk.
    pub fn append_durably(&mut self, framed: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(framed, self.pos)?;
        self.file.sync_data()?;
        self.pos += framed.len() as u64;
        Ok(())
    }

    /// After a durable checkpoint that stored `epoch`: later records go from the start.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.pos = 0;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
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

    #[test]
    fn records_of_the_current_epoch_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, found) = Wal::open(&path, 4096, 7).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        append(&mut wal, &[b"one", b"two"]);
        append(&mut wal, &[b"three"]);
        drop(wal);
        let (_, found) = Wal::open(&path, 4096, 7).unwrap();
        assert_eq!(
            found,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn older_epochs_beyond_the_newest_records_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path, 4096, 1).unwrap();
        append(&mut wal, &[b"old-1", b"old-2", b"old-3"]);
        wal.restart(2);
        append(&mut wal, &[b"new-1"]);
        drop(wal);
        let (_, found) = Wal::open(&path, 4096, 2).unwrap();
        assert_eq!(found, vec![b"new-1".to_vec()]);
        // Right after a checkpoint to epoch 3 nothing is replayed.
        let (_, found) = Wal::open(&path, 4096, 3).unwrap();
        assert!(found.is_empty());
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path, 4096, 1).unwrap();
        append(&mut wal, &[b"whole", b"torn!"]);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // Corrupt the last byte of the second payload.
        file.write_all_at(b"?", (HEADER + 5 + HEADER + 4) as u64)
            .unwrap();
        let (wal, found) = Wal::open(&path, 4096, 1).unwrap();
        assert_eq!(found, vec![b"whole".to_vec()]);
        assert!(wal.fits(4096 - HEADER - 5));
        assert!(!wal.fits(4096 - HEADER - 4));
    }
}
