//! The CLI's side of the local API: finds the agent (address and token from its data
//! directory, or from flags and environment) and makes requests.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use nubo_agent::model::ApiErrorBody;
use nubo_agent::setup::{API_ADDR_FILE, API_TOKEN_FILE};
use serde::de::DeserializeOwned;

/// Most bytes read from one answer (a blob can be this large).
const ANSWER_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// A connection to one agent's API.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// For answers that stream as long as the caller reads (`--follow`): no overall timeout.
    streaming: ureq::Agent,
}

/// How the CLI finds the agent.
pub struct Target<'a> {
    /// The agent's data directory.
    pub data_dir: &'a Path,
    /// An explicit API address.
    pub api: Option<&'a str>,
    /// An explicit token.
    pub token: Option<&'a str>,
}

impl Client {
    /// A client of the agent named by `target`.
    pub fn connect(target: &Target<'_>) -> Result<Client, String> {
        if target.api.is_none() && !target.data_dir.join("state.redb").exists() {
            let dir = target.data_dir.display();
            return Err(format!(
                "no nubo data directory at {dir}: create a cloud with `nubo init --data-dir {dir}` and run its agent with `nubo agent --data-dir {dir}` (or join one: `nubo agent --data-dir {dir} --join TOKEN`), or pass the --data-dir of a running agent"
            ));
        }
        let read = |name: &str| {
            std::fs::read_to_string(target.data_dir.join(name))
                .map(|s| s.trim().to_string())
                .map_err(|e| {
                    format!(
                        "cannot read {} ({e}): is an agent running with --data-dir {}? Start one with `nubo agent`, or pass --data-dir",
                        target.data_dir.join(name).display(),
                        target.data_dir.display()
                    )
                })
        };
        let api = match target.api {
            Some(api) => api.to_string(),
            None => read(API_ADDR_FILE)?,
        };
        let token = match target.token {
            Some(token) => token.to_string(),
            None => read(API_TOKEN_FILE)?,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(120))
            .build();
        let streaming = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .build();
        Ok(Client {
            base: format!("http://{api}"),
            token,
            agent,
            streaming,
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// A GET whose answer streams for as long as it is read.
    pub fn stream(&self, path: &str) -> Result<ureq::Response, String> {
        let request = self
            .streaming
            .request("GET", &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        answer(&self.base, request.call())
    }

    /// Sends a request; a non-2xx answer becomes its error message.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ureq::Response, String> {
        let request = self.request(method, path);
        let result = match body {
            Some(bytes) => request.send_bytes(bytes),
            None => request.call(),
        };
        answer(&self.base, result)
    }

    /// Sends a request and reads a JSON answer.
    pub fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, String> {
        let bytes = read_body(self.send(method, path, body)?)?;
        serde_json::from_slice(&bytes).map_err(|e| format!("unexpected answer from the agent: {e}"))
    }
}

/// A successful answer, or the agent's error message.
fn answer(
    base: &str,
    result: Result<ureq::Response, ureq::Error>,
) -> Result<ureq::Response, String> {
    match result {
        Ok(response) => Ok(response),
        Err(ureq::Error::Status(code, response)) => {
            let text = response.into_string().unwrap_or_default();
            let message = serde_json::from_str::<ApiErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            Err(format!("{message} (HTTP {code})"))
        }
        Err(error) => Err(format!(
            "cannot reach the agent at {base}: {error}. Is it running?"
        )),
    }
}

/// The whole body of an answer, bounded.
pub fn read_body(response: ureq::Response) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(ANSWER_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    Ok(bytes)
}

/// A key as a URL path segment: everything but unreserved characters and `/` is escaped.
pub fn escape_key(key: &str) -> String {
    let mut escaped = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}
