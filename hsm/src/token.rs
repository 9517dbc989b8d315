//! Loading a PKCS#11 module, selecting a token by label and opening logged-in sessions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use crate::keys::{KeyInfo, KeySecurity};
use crate::{Error, KeyAlgorithm, Pin, PinSource, PublicKey, Result};

/// Where SoftHSM2 is usually installed, most likely first.
const SOFTHSM_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
];

/// The SoftHSM2 module found on this system, if any (Debian: `/usr/lib/softhsm/libsofthsm2.so`).
pub fn default_module_path() -> Option<PathBuf> {
    SOFTHSM_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A loaded and initialised PKCS#11 module. Loading the same path twice in one process gives
/// the same module (PKCS#11 allows one `C_Initialize` per process).
#[derive(Clone, Debug)]
pub struct Module {
    pkcs11: Pkcs11,
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What every handle to one loaded module shares.
#[derive(Debug, Default)]
struct Shared {
    /// Held (shared) around every call that uses a session; re-initialisation takes it
    /// exclusively, so `C_Finalize` never runs while another thread is inside the module.
    calls: RwLock<()>,
    /// Bumped by each re-initialisation: sessions of an older generation are dead, and their
    /// handles may be reused by new sessions, so they are forgotten, never closed.
    generation: AtomicU64,
    last_reinit: Mutex<Option<std::time::Instant>>,
}

impl Module {
    /// Loads and initialises the module at `path`.
    pub fn load(path: &Path) -> Result<Module> {
        type Loaded = HashMap<PathBuf, (Pkcs11, Arc<Shared>)>;
        static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let mut loaded = LOADED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((pkcs11, shared)) = loaded.get(path) {
            return Ok(Module {
                pkcs11: pkcs11.clone(),
                path: path.to_owned(),
                shared: shared.clone(),
            });
        }
        let load_err = |source| Error::LoadModule {
            path: path.display().to_string(),
            source,
        };
        let pkcs11 = Pkcs11::new(path).map_err(load_err)?;
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(load_err(e)),
        }
        let shared = Arc::new(Shared::default());
        loaded.insert(path.to_owned(), (pkcs11.clone(), shared.clone()));
        Ok(Module {
            pkcs11,
            path: path.to_owned(),
            shared,
        })
    }

    /// Shared access for a call into the module (see [`Module::reinitialize`]).
    pub(crate) fn calls(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.shared.calls.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The current generation of sessions.
    pub(crate) fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Finalises and re-initialises the module, at most once a second: a module that talks to a
    /// remote HSM (p11-kit's client) reconnects only on `C_Initialize`. Sessions opened before
    /// are gone afterwards.
    pub fn reinitialize(&self) {
        let mut last = self
            .shared
            .last_reinit
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        // Wait for every call in flight to return, then nobody enters while the module restarts.
        let _exclusive = self.shared.calls.write().unwrap_or_else(|p| p.into_inner());
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.pkcs11.clone().finalize();
        match self
            .pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) => {
                tracing::warn!(module = %self.path.display(), "re-initialised the PKCS#11 module")
            }
            Err(e) => {
                tracing::warn!(module = %self.path.display(), error = %e, "re-initialising the PKCS#11 module failed")
            }
        }
    }

    /// The module path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The slot holding the initialised token with this label.
    pub fn find_token(&self, label: &str) -> Result<Slot> {
        for slot in self.pkcs11.get_slots_with_initialized_token()? {
            let info = self.pkcs11.get_token_info(slot)?;
            if info.label().trim_end() == label {
                return Ok(slot);
            }
        }
        Err(Error::TokenNotFound(label.to_owned()))
    }

    /// Labels of the initialised tokens of this module.
    pub fn token_labels(&self) -> Result<Vec<String>> {
        let mut labels = Vec::new();
        for slot in self.pkcs11.get_slots_with_initialized_token()? {
            labels.push(
                self.pkcs11
                    .get_token_info(slot)?
                    .label()
                    .trim_end()
                    .to_owned(),
            );
        }
        Ok(labels)
    }

    /// Initialises a new token with `label` in the first free slot and sets its user PIN.
    /// Refuses when a token with that label exists.
    pub fn init_token(&self, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<()> {
        if self.find_token(label).is_ok() {
            return Err(Error::LabelExists(label.to_owned()));
        }
        let mut free = None;
        for slot in self.pkcs11.get_slots_with_token()? {
            if !self.pkcs11.get_token_info(slot)?.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| Error::TokenNotFound("<a free slot>".into()))?;
        self.pkcs11.init_token(slot, &so_pin.auth_pin(), label)?;
        let session = self.pkcs11.open_rw_session(slot)?;
        session.login(UserType::So, Some(&so_pin.auth_pin()))?;
        session.init_pin(&user_pin.auth_pin())?;
        session.logout()?;
        Ok(())
    }

    /// Opens the token with this label, reading the PIN from `pin`.
    pub fn open_token(&self, label: &str, pin: Pin) -> Result<Arc<Token>> {
        let slot = self.find_token(label)?;
        let token = Arc::new(Token {
            module: self.clone(),
            label: label.to_owned(),
            pin,
            slot: Mutex::new(slot),
        });
        // Log in once now so that a wrong PIN fails at start, not at the first request.
        token.open_session()?;
        Ok(token)
    }
}

/// What identifies a token: module, label and PIN source.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Token label.
    pub label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
}

impl TokenConfig {
    /// Loads the module, reads the PIN and opens the token.
    pub fn open(&self) -> Result<Arc<Token>> {
        let pin = self.pin.read()?;
        Module::load(&self.module)?.open_token(&self.label, pin)
    }
}

/// A token selected by label, with the user PIN to log in.
#[derive(Debug)]
pub struct Token {
    module: Module,
    label: String,
    pin: Pin,
    slot: Mutex<Slot>,
}

impl Token {
    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The module this token lives in.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// Opens a read-write session and logs the application in (once per application), and
    /// returns it with its generation. The slot is looked up again by label when the remembered
    /// one is gone; if the module itself fails (a network HSM restarted), it is re-initialised
    /// once and the session opened again.
    pub(crate) fn open_session_gen(&self) -> Result<(Session, u64)> {
        match self.try_open_session() {
            Ok(s) => Ok(s),
            Err(e) if e.is_session_lost() || matches!(e, Error::TokenNotFound(_)) => {
                self.module.reinitialize();
                self.try_open_session()
            }
            Err(e) => Err(e),
        }
    }

    /// A session for a one-off task (key generation, listing); see [`Token::open_session_gen`].
    pub(crate) fn open_session(&self) -> Result<Session> {
        self.open_session_gen().map(|(s, _)| s)
    }

    fn try_open_session(&self) -> Result<(Session, u64)> {
        let _call = self.module.calls();
        let generation = self.module.generation();
        let slot = *self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let session = match self.module.pkcs11.open_rw_session(slot) {
            Ok(s) => s,
            Err(_) => {
                let slot = self.module.find_token(&self.label)?;
                *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = slot;
                self.module.pkcs11.open_rw_session(slot)?
            }
        };
        match session.login(UserType::User, Some(&self.pin.auth_pin())) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok((session, generation))
    }

    /// Logs the application out of the token: every session loses its login.
    pub fn logout(&self) -> Result<()> {
        let session = self.open_session()?;
        session.logout()?;
        Ok(())
    }

    /// Generates a CA key pair inside the token: the private key is sensitive, never
    /// extractable and may only sign. Refuses a label that is already used.
    pub fn generate_key(&self, label: &str, algorithm: KeyAlgorithm) -> Result<KeyInfo> {
        let session = self.open_session()?;
        if !session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?
            .is_empty()
        {
            return Err(Error::LabelExists(label.to_owned()));
        }
        let id = session.generate_random_vec(16)?;
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        public.extend(algorithm.public_template());
        let private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::SignRecover(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id),
        ];
        session.generate_key_pair(&algorithm.keygen_mechanism(), &public, &private)?;
        self.key_info_in(&session, label)
    }

    /// Every private key in the token, with its security attributes.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let session = self.open_session()?;
        let handles = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
        let mut keys = Vec::with_capacity(handles.len());
        for handle in handles {
            keys.push(self.describe(&session, handle)?);
        }
        keys.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(keys)
    }

    /// The private key labelled `label`, with its security attributes.
    pub fn key_info(&self, label: &str) -> Result<KeyInfo> {
        let session = self.open_session()?;
        self.key_info_in(&session, label)
    }

    fn key_info_in(&self, session: &Session, label: &str) -> Result<KeyInfo> {
        let handle = self.find_private_key(session, label)?;
        self.describe(session, handle)
    }

    /// The handle of the one private key labelled `label`.
    pub(crate) fn find_private_key(&self, session: &Session, label: &str) -> Result<ObjectHandle> {
        let handles = session.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        match handles.len() {
            0 => Err(Error::KeyNotFound(label.to_owned(), self.label.clone())),
            1 => Ok(handles[0]),
            count => Err(Error::AmbiguousKey {
                label: label.to_owned(),
                count,
            }),
        }
    }

    fn describe(&self, session: &Session, handle: ObjectHandle) -> Result<KeyInfo> {
        let attrs = session.get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::KeyType,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Sign,
                AttributeType::Decrypt,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::Local,
            ],
        )?;
        let mut info = KeyInfo::default();
        let mut key_type = None;
        for attr in attrs {
            let s = &mut info.security;
            match attr {
                Attribute::Label(v) => info.label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::Id(v) => info.id = v,
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Token(b) => s.token = b,
                Attribute::Private(b) => s.private = b,
                Attribute::Sensitive(b) => s.sensitive = b,
                Attribute::Extractable(b) => s.extractable = b,
                Attribute::AlwaysSensitive(b) => s.always_sensitive = b,
                Attribute::NeverExtractable(b) => s.never_extractable = b,
                Attribute::Sign(b) => s.sign = b,
                Attribute::Decrypt(b) => s.decrypt = b,
                Attribute::Unwrap(b) => s.unwrap = b,
                Attribute::Derive(b) => s.derive = b,
                Attribute::Local(b) => s.local = b,
                _ => {}
            }
        }
        info.public_key = self.public_key_for(session, &info.id, key_type).ok();
        info.algorithm = info.public_key.as_ref().and_then(PublicKey::algorithm);
        Ok(info)
    }

    /// The public key of the private key labelled `label`, read from its public key object.
    pub fn public_key(&self, label: &str) -> Result<PublicKey> {
        let session = self.open_session()?;
        let info = self.key_info_in(&session, label)?;
        info.public_key.ok_or_else(|| {
            Error::PublicKey(format!("no readable public key object for key {label:?}"))
        })
    }

    fn public_key_for(
        &self,
        session: &Session,
        id: &[u8],
        key_type: Option<KeyType>,
    ) -> Result<PublicKey> {
        let handles = session.find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ])?;
        let handle = *handles
            .first()
            .ok_or_else(|| Error::PublicKey("no public key object with the key's CKA_ID".into()))?;
        match key_type {
            Some(KeyType::EC) => {
                let attrs = session
                    .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])?;
                let (mut params, mut point) = (Vec::new(), Vec::new());
                for attr in attrs {
                    match attr {
                        Attribute::EcParams(v) => params = v,
                        Attribute::EcPoint(v) => point = v,
                        _ => {}
                    }
                }
                let algorithm = [KeyAlgorithm::EcdsaP256, KeyAlgorithm::EcdsaP384]
                    .into_iter()
                    .find(|a| a.ec_params().as_deref() == Some(&params[..]))
                    .ok_or_else(|| {
                        Error::UnsupportedKey("EC key on an unsupported curve".into())
                    })?;
                // CKA_EC_POINT is a DER OCTET STRING around the point (some tokens omit it).
                let raw = match <der::asn1::OctetString as der::Decode>::from_der(&point) {
                    Ok(os) => os.into_bytes().into_vec(),
                    Err(_) => point,
                };
                PublicKey::from_ec_point(algorithm, &raw)
            }
            Some(KeyType::RSA) => {
                let attrs = session.get_attributes(
                    handle,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )?;
                let (mut n, mut e) = (Vec::new(), Vec::new());
                for attr in attrs {
                    match attr {
                        Attribute::Modulus(v) => n = v,
                        Attribute::PublicExponent(v) => e = v,
                        _ => {}
                    }
                }
                PublicKey::from_rsa_parts(&n, &e)
            }
            other => Err(Error::UnsupportedKey(format!("key type {other:?}"))),
        }
    }
}

impl KeySecurity {
    pub(crate) fn require_protected(&self, label: &str) -> Result<()> {
        match self.problems().first() {
            None => Ok(()),
            Some(problem) => Err(Error::InsecureKey {
                label: label.to_owned(),
                reason: problem.clone(),
            }),
        }
    }
}
