//! Wires the HTTP clients of each environment (one token source per app registration), cached
//! by a fingerprint of everything they were built from: an edited registry entry (a corrected
//! URL, another client id or secret source) gets new clients on the next event, without a
//! restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Http, dataverse, fno, token};
use relink_core::error::Result;
use relink_core::ports::{SecretStore, TokenSource};

type ClientPair = (Arc<dataverse::DataverseClient>, Arc<fno::FnoClient>);

/// Builds and caches the HTTP clients of each environment over one shared [`Http`].
pub struct HttpConnector {
    http: Arc<Http>,
    secrets: Arc<dyn SecretStore>,
    /// By environment id: the fingerprint of the entry the clients were built from, and them.
    clients: Mutex<HashMap<String, (String, ClientPair)>>,
    /// Gateway clients, cached the same way (their token cache lives as long as they do).
    gateways: Mutex<HashMap<String, (String, Arc<crate::gateway::GatewayClient>)>>,
}

impl HttpConnector {
    /// A connector over `http`; client secrets the registry did not resolve come from `secrets`.
    pub fn new(http: Arc<Http>, secrets: Arc<dyn SecretStore>) -> HttpConnector {
        HttpConnector {
            http,
            secrets,
            clients: Mutex::new(HashMap::new()),
            gateways: Mutex::new(HashMap::new()),
        }
    }

    /// The shared HTTP client.
    pub fn http(&self) -> &Arc<Http> {
        &self.http
    }

    fn clients(
        &self,
        env: &relink_core::registry::EnvConfig,
    ) -> Result<(Arc<dataverse::DataverseClient>, Arc<fno::FnoClient>)> {
        // Every field but the secret's value, which is not printed (`Secret`'s Debug hides it):
        // a value read from the store is re-read on its own schedule.
        let fingerprint = format!("{env:?}");
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, pair)) = clients.get(&env.id)
            && *seen == fingerprint
        {
            return Ok(pair.clone());
        }
        let secret = match &env.client_secret {
            Some(s) => token::ClientSecret::Known(s.clone()),
            None => token::ClientSecret::Stored(self.secrets.clone(), env.secret_source.clone()),
        };
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
        clients.insert(env.id.clone(), (fingerprint, pair.clone()));
        Ok(pair)
    }
}

impl relink_core::ports::Connector for HttpConnector {
    fn dataverse(
        &self,
        env: &relink_core::registry::EnvConfig,
    ) -> Result<Arc<dyn relink_core::ports::DataverseApi>> {
        Ok(self.clients(env)?.0)
    }
    fn fno(
        &self,
        env: &relink_core::registry::EnvConfig,
    ) -> Result<Arc<dyn relink_core::ports::FnoApi>> {
        Ok(self.clients(env)?.1)
    }
    fn gateway(
        &self,
        env: &relink_core::registry::EnvConfig,
    ) -> Result<Arc<dyn relink_core::ports::DualWriteGateway>> {
        let relink_core::registry::ResetMode::Gateway(cfg) = &env.reset else {
            return Err(relink_core::Error::Config(format!(
                "environment {} does not reset through the gateway",
                env.id
            )));
        };
        let fingerprint = format!("{env:?}");
        let mut gateways = self.gateways.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, client)) = gateways.get(&env.id)
            && *seen == fingerprint
        {
            return Ok(client.clone());
        }
        let tokens = Arc::new(crate::delegated::DelegatedTokens::new(
            self.http.clone(),
            &env.authority,
            &env.tenant_id,
            &cfg.token,
            self.secrets.clone(),
            &env.id,
            "gateway",
        ));
        let client = Arc::new(crate::gateway::GatewayClient::new(
            self.http.clone(),
            tokens,
            cfg.gateway.clone(),
            env.fno_url.clone(),
        ));
        gateways.insert(env.id.clone(), (fingerprint, client.clone()));
        Ok(client)
    }
    fn notifier(&self) -> Arc<dyn relink_core::ports::Notifier> {
        Arc::new(crate::notifier::WebhookNotifier::new(
            &self.http,
            self.secrets.clone(),
        ))
    }
}
