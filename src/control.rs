//! The control socket: how `ferry sync` and `ferry status` talk to a mount daemon.
//!
//! A unix stream socket under the mount's state directory (mode 0600: root only), one JSON
//! object per line each way: a request `{"cmd": "...", ...}` and one response, which is
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. The daemon serves each connection
//! on its own thread, so a long `sync` does not block `status`. Clients find the socket from
//! the mountpoint alone through the `user.ferry.control` extended attribute of its root.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// Answers one request.
pub type Handler = dyn Fn(&Value) -> Result<Value> + Send + Sync;

/// Listens on `path` (replacing a stale socket) and serves requests on background threads.
pub fn serve(path: &Path, handler: Arc<Handler>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let h = handler.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || answer(conn, &*h));
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, handler: &Handler) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Value>(&line) {
        Ok(req) => match handler(&req) {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("ok".into(), Value::Bool(true));
                }
                v
            }
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

/// The control socket of the ferry mount at `mountpoint`.
pub fn socket_of(mountpoint: &Path) -> Result<PathBuf> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    let name = std::ffi::CString::new(crate::fs::fuse::CONTROL_XATTR)?;
    let mut buf = vec![0u8; 4096];
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            bail!(
                "the mount at {0} has lost its daemon (it exited or was killed: {e}); its log \
                 (in the mount's state directory, or the journal under systemd) says why. \
                 Detach it with `umount -l {0}` and mount again: nothing the VMs fsynced is \
                 lost, and the intent log names what the next sync point must re-read",
                mountpoint.display()
            );
        }
        bail!(
            "{} is not a ferry mount ({e}); give the mountpoint of a running `ferry mount`",
            mountpoint.display()
        );
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(String::from_utf8(buf)?))
}

/// Sends one request to the daemon behind `socket` and returns its response; `timeout` bounds
/// the wait for the answer (None: wait as long as it takes).
pub fn request(socket: &Path, req: &Value, timeout: Option<Duration>) -> Result<Value> {
    let conn = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the mount daemon at {}", socket.display()))?;
    conn.set_read_timeout(timeout)?;
    let mut w = &conn;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .with_context(|| format!("no answer from the mount daemon at {}", socket.display()))?;
    if line.is_empty() {
        bail!(
            "the mount daemon at {} closed the connection without answering: it has exited \
             or crashed. Its log (in the mount's state directory, or the journal under \
             systemd) says why; mount again and run the command again (nothing the VMs \
             fsynced is lost: the intent log marks what the next sync point must re-read)",
            socket.display()
        );
    }
    let v: Value = serde_json::from_str(&line).context("malformed answer from the mount daemon")?;
    if v["ok"] != Value::Bool(true) {
        return Err(anyhow!(
            "{}",
            v["error"]
                .as_str()
                .unwrap_or("the mount daemon refused the request")
        ));
    }
    Ok(v)
}
