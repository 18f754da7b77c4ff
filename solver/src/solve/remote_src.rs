//! `ADD` of http(s) URLs and git repositories in the build: the remote
//! sources of a step are fetched (off the async threads) into scratch
//! directories before its key is computed, so the key covers what was
//! fetched (content digest, commit) and the copy reads it like a local
//! source. See [`crate::remote`].

use super::{at_line, blocking, Solver};
use crate::error::BuildError;
use crate::remote::{self, Fetched};

impl Solver {
    /// Splits `sources` into local ones and fetched remote ones.
    pub(super) async fn fetch_remote_sources(
        &self,
        sources: &[String],
        checksum: Option<&str>,
        keep_git_dir: bool,
        line: crate::error::Location,
    ) -> Result<(Vec<String>, Vec<Fetched>), BuildError> {
        let is_remote = |s: &str| remote::is_http_url(s) || remote::is_git_url(s);
        if checksum.is_some() {
            if sources.len() != 1 {
                return Err(BuildError::at(
                    line,
                    "checksum can't be specified for multiple sources",
                ));
            }
            if !sources.iter().all(|s| is_remote(s)) {
                return Err(BuildError::at(
                    line,
                    "checksum requires HTTP(S) or Git sources",
                ));
            }
        }
        let mut local = Vec::new();
        let mut fetched = Vec::new();
        for s in sources {
            if !is_remote(s) {
                local.push(s.clone());
                continue;
            }
            let scratch = self.backend.scratch_dir();
            let url = s.clone();
            let sum = checksum.map(str::to_string);
            // A repository a Dockerfile names gets the SSH agent given
            // with `--ssh default`, and no other credential of the host.
            let auth = remote::GitAuth {
                // (absolute: git runs ssh in the checkout's directory)
                ssh_agent: self
                    .opts
                    .ssh
                    .get("default")
                    .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            };
            let f = blocking(move || {
                if remote::is_git_url(&url) {
                    remote::fetch_git(&url, &scratch, keep_git_dir, sum.as_deref(), &auth)
                } else {
                    remote::fetch_http(&url, &scratch, sum.as_deref())
                }
            })
            .await
            .map_err(at_line(line))?;
            fetched.push(f);
        }
        Ok((local, fetched))
    }
}
