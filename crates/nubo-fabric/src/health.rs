//! Health probes: an HTTP GET answered with 2xx or 3xx, a TCP connection accepted, or a
//! command that exits with status 0, each within a timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Bytes of an answer read before a probe gives up reading (and closes the connection).
pub const HTTP_ANSWER_BYTES_MAX: usize = 1 << 20;

/// Whether `GET path` on 127.0.0.1:`port` answers 2xx or 3xx within `limit`. The whole
/// answer is read (up to [`HTTP_ANSWER_BYTES_MAX`]) before the connection closes, so the
/// server never sees its answer cut off.
pub async fn http(port: u16, path: &str, limit: Duration) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: nubo-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 8192];
        while answer.len() < HTTP_ANSWER_BYTES_MAX {
            let n = stream.read(&mut buffer).await.ok()?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
        let line = answer.split(|b| *b == b'\n').next()?;
        let line = std::str::from_utf8(line).ok()?;
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(timeout(limit, probe).await, Ok(Some(true)))
}

/// Whether 127.0.0.1:`port` accepts a connection within `limit`.
pub async fn tcp(port: u16, limit: Duration) -> bool {
    matches!(
        timeout(limit, TcpStream::connect(("127.0.0.1", port))).await,
        Ok(Ok(_))
    )
}

/// Whether `argv` exits with status 0 within `limit` (it is killed otherwise).
pub async fn command(argv: &[String], dir: &std::path::Path, limit: Duration) -> bool {
    let Some((program, args)) = argv.split_first() else {
        return false;
    };
    let Ok(mut child) = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
    else {
        return false;
    };
    matches!(timeout(limit, child.wait()).await, Ok(Ok(status)) if status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_tell_a_listening_port_from_a_closed_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").await;
            }
        });
        let limit = Duration::from_secs(2);
        assert!(tcp(port, limit).await);
        assert!(http(port, "/", limit).await);
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!tcp(closed_port, limit).await);
        assert!(!http(closed_port, "/", limit).await);
        let dir = std::env::temp_dir();
        assert!(command(&["true".into()], &dir, limit).await);
        assert!(!command(&["false".into()], &dir, limit).await);
        assert!(
            !command(
                &["sleep".into(), "5".into()],
                &dir,
                Duration::from_millis(100)
            )
            .await
        );
    }
}
