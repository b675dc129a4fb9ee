//! Wires the HTTP clients of each environment (one token source per app registration).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Http, dataverse, fno, token};
use crate::error::{Error, Result};
use crate::ports::TokenSource;

type ClientPair = (Arc<dataverse::DataverseClient>, Arc<fno::FnoClient>);

/// Builds and caches the HTTP clients of each environment over one shared [`Http`].
pub struct HttpConnector {
    http: Arc<Http>,
    clients: Mutex<HashMap<String, ClientPair>>,
}

impl HttpConnector {
    /// A connector over `http`.
    pub fn new(http: Arc<Http>) -> HttpConnector {
        HttpConnector {
            http,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn clients(
        &self,
        env: &crate::registry::EnvConfig,
    ) -> Result<(Arc<dataverse::DataverseClient>, Arc<fno::FnoClient>)> {
        let mut clients = self.clients.lock().expect("connector lock");
        if let Some(c) = clients.get(&env.id) {
            return Ok(c.clone());
        }
        let secret = env.client_secret.clone().ok_or_else(|| {
            Error::Config(format!(
                "the client secret of environment `{}` ({:?}) is not available: relink run reads only client_secret = {{ env = \"VARIABLE\" }}; the AWS functions read secret_arn, and log why when they cannot",
                env.id, env.secret_source
            ))
        })?;
        let tokens: Arc<dyn TokenSource> = Arc::new(token::EntraTokens::new(
            self.http.clone(),
            &env.authority,
            &env.tenant_id,
            &env.client_id,
            secret,
        ));
        let pair = (
            Arc::new(dataverse::DataverseClient::new(
                self.http.clone(),
                tokens.clone(),
                env,
            )),
            Arc::new(fno::FnoClient::new(self.http.clone(), tokens, env)),
        );
        clients.insert(env.id.clone(), pair.clone());
        Ok(pair)
    }
}

impl crate::ports::Connector for HttpConnector {
    fn dataverse(
        &self,
        env: &crate::registry::EnvConfig,
    ) -> Result<Arc<dyn crate::ports::DataverseApi>> {
        Ok(self.clients(env)?.0)
    }
    fn fno(&self, env: &crate::registry::EnvConfig) -> Result<Arc<dyn crate::ports::FnoApi>> {
        Ok(self.clients(env)?.1)
    }
}
