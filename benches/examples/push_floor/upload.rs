//! One upload's hashing and cutting: on two threads of its own, fed
//! blocks read straight from the socket, or on its connection's thread.

use crate::cut::{Cutter, Keys};
use crate::keep::Sink;
use crate::Work;
use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::Digest as _;
use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes read from the socket at a time, handed on whole.
const BLOCK_BYTES: usize = 4 << 20;
/// Blocks in flight per threaded upload (the bound of its queues).
const BLOCKS_PER_UPLOAD: usize = 4;

enum Msg {
    Block(Vec<u8>, usize),
    /// Every byte so far hashed and cut (what is buffered cut at a forced
    /// boundary, as Orlop's checkpoint of a PATCH does); with `last`, the
    /// reply is the digest.
    Barrier {
        last: bool,
        reply: Sender<io::Result<String>>,
    },
}

/// One upload's hashing (and, with `Work::Full`, cutting).
enum Pipe {
    Inline {
        sha: sha2::Sha256,
        cutter: Option<Box<Cutter>>,
        block: Vec<u8>,
    },
    Threaded {
        tx: Sender<Msg>,
        free: Receiver<Vec<u8>>,
        threads: Vec<JoinHandle<()>>,
    },
}

pub(crate) struct Upload {
    pipe: Pipe,
    pub(crate) bytes: u64,
}

fn hex_digest(sha: sha2::Sha256) -> String {
    format!("sha256:{}", hex::encode(sha.finalize()))
}

impl Upload {
    /// With a sink (`--keep`, and only with `Work::Full`) the records are
    /// written and synced.
    pub(crate) fn new(
        work: Work,
        keys: &Arc<Keys>,
        inline: bool,
        sink: Option<Sink>,
    ) -> io::Result<Upload> {
        let cutter = (work == Work::Full).then(|| Box::new(Cutter::new(keys.clone(), sink)));
        if inline {
            let pipe = Pipe::Inline {
                sha: sha2::Sha256::new(),
                cutter,
                block: vec![0; BLOCK_BYTES],
            };
            return Ok(Upload { pipe, bytes: 0 });
        }
        let (free_tx, free) = bounded(BLOCKS_PER_UPLOAD);
        for _ in 0..BLOCKS_PER_UPLOAD {
            free_tx
                .send(vec![0u8; BLOCK_BYTES])
                .map_err(|_| io::Error::other("free queue"))?;
        }
        let (tx, sha_rx) = bounded::<Msg>(BLOCKS_PER_UPLOAD);
        let mut threads = Vec::new();
        let cut_tx = match cutter {
            Some(mut c) => {
                let (cut_tx, cut_rx) = bounded::<Msg>(BLOCKS_PER_UPLOAD);
                let free_tx = free_tx.clone();
                threads.push(std::thread::spawn(move || {
                    let mut failed = None;
                    while let Ok(m) = cut_rx.recv() {
                        match m {
                            Msg::Block(b, n) => {
                                if failed.is_none() {
                                    failed = c.feed(&b[..n]).err();
                                }
                                let _ = free_tx.send(b);
                            }
                            Msg::Barrier { reply, .. } => {
                                let r = match failed.take() {
                                    Some(e) => Err(e),
                                    None => c.finish().map(|()| String::new()),
                                };
                                let _ = reply.send(r);
                            }
                        }
                    }
                }));
                Some(cut_tx)
            }
            None => None,
        };
        threads.push(std::thread::spawn(move || {
            let mut sha = sha2::Sha256::new();
            while let Ok(m) = sha_rx.recv() {
                match m {
                    Msg::Block(b, n) => {
                        sha.update(&b[..n]);
                        let _ = match &cut_tx {
                            Some(t) => t.send(Msg::Block(b, n)).is_ok(),
                            None => free_tx.send(b).is_ok(),
                        };
                    }
                    Msg::Barrier { last, reply } => {
                        let digest = match last {
                            true => hex_digest(std::mem::take(&mut sha)),
                            false => String::new(),
                        };
                        let r = match &cut_tx {
                            Some(t) => {
                                let (atx, arx) = bounded(1);
                                let cut = t
                                    .send(Msg::Barrier { last, reply: atx })
                                    .map_err(|_| io::Error::other("cutter gone"))
                                    .and_then(|()| {
                                        arx.recv().map_err(|_| io::Error::other("cutter gone"))?
                                    });
                                cut.map(|_| digest)
                            }
                            None => Ok(digest),
                        };
                        let _ = reply.send(r);
                    }
                }
            }
        }));
        Ok(Upload {
            pipe: Pipe::Threaded { tx, free, threads },
            bytes: 0,
        })
    }

    /// Takes `len` body bytes: those already read (`pending`), then the
    /// socket's, a block at a time.
    pub(crate) fn take_body(
        &mut self,
        s: &mut TcpStream,
        pending: &mut Vec<u8>,
        len: u64,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let mut block = self.next_block()?;
            let want = (left as usize).min(BLOCK_BYTES);
            let from_pending = pending.len().min(want);
            block[..from_pending].copy_from_slice(&pending[..from_pending]);
            pending.drain(..from_pending);
            let mut n = from_pending;
            while n < want {
                let r = s.read(&mut block[n..want])?;
                if r == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                n += r;
            }
            self.hand_on(block, n)?;
            left -= n as u64;
            self.bytes += n as u64;
        }
        Ok(())
    }

    fn next_block(&mut self) -> io::Result<Vec<u8>> {
        match &mut self.pipe {
            Pipe::Inline { block, .. } => Ok(std::mem::take(block)),
            Pipe::Threaded { free, .. } => {
                free.recv().map_err(|_| io::Error::other("pipeline gone"))
            }
        }
    }

    fn hand_on(&mut self, b: Vec<u8>, n: usize) -> io::Result<()> {
        match &mut self.pipe {
            Pipe::Inline { sha, cutter, block } => {
                sha.update(&b[..n]);
                if let Some(c) = cutter {
                    c.feed(&b[..n])?;
                }
                *block = b;
                Ok(())
            }
            Pipe::Threaded { tx, .. } => tx
                .send(Msg::Block(b, n))
                .map_err(|_| io::Error::other("pipeline gone")),
        }
    }

    /// Returns once every byte so far is hashed and cut, what is buffered
    /// at a forced boundary: what a PATCH's 202 waits for in Orlop (which
    /// then also makes them durable).
    pub(crate) fn barrier(&mut self) -> io::Result<()> {
        match &mut self.pipe {
            Pipe::Inline { cutter, .. } => match cutter {
                Some(c) => c.finish(),
                None => Ok(()),
            },
            Pipe::Threaded { tx, .. } => {
                let (rtx, rrx) = bounded(1);
                tx.send(Msg::Barrier {
                    last: false,
                    reply: rtx,
                })
                .map_err(|_| io::Error::other("pipeline gone"))?;
                rrx.recv()
                    .map_err(|_| io::Error::other("pipeline gone"))?
                    .map(|_| ())
            }
        }
    }

    /// Ends the upload: its digest once every byte is hashed and cut.
    pub(crate) fn finish(self) -> io::Result<String> {
        match self.pipe {
            Pipe::Inline { sha, cutter, .. } => {
                if let Some(mut c) = cutter {
                    c.finish()?;
                }
                Ok(hex_digest(sha))
            }
            Pipe::Threaded { tx, threads, .. } => {
                let (rtx, rrx) = bounded(1);
                tx.send(Msg::Barrier {
                    last: true,
                    reply: rtx,
                })
                .map_err(|_| io::Error::other("pipeline gone"))?;
                let r = rrx.recv().map_err(|_| io::Error::other("pipeline gone"))?;
                drop(tx);
                for t in threads {
                    let _ = t.join();
                }
                r
            }
        }
    }
}
