//! `tandem certs`: a private CA and a certificate for every component of the pair file, at
//! the paths its `[tls]` section names. For tests and first use; production brings its own PKI.
//!
//! Every component's certificate names the component, the pair (what clients verify, so any
//! member passes for the pair) and its listen address; it serves and, under mutual TLS,
//! identifies the component as a client. The CA's key is kept next to its certificate: run
//! again after adding a component, the command signs the missing files with the same CA and
//! keeps the others; `--force` makes a new CA and replaces every file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tandem_config::{PairFile, TlsSection, resolve};

/// Roughly the current year, for validity dates (no calendar crate needed for that).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn validity(params: &mut CertificateParams) {
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 3, 1, 1);
}

struct Writer {
    force: bool,
    written: Vec<PathBuf>,
    kept: Vec<PathBuf>,
}

impl Writer {
    /// Whether `path` is to be (re)made.
    fn wanted(&mut self, path: &Path) -> bool {
        if path.exists() && !self.force {
            self.kept.push(path.to_path_buf());
            return false;
        }
        true
    }

    fn write(&mut self, path: &Path, text: &str, secret: bool) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        use std::io::Write;
        options
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.written.push(path.to_path_buf());
        Ok(())
    }

    /// Writes a certificate and its key, both or neither.
    fn pair(
        &mut self,
        cert_path: &Path,
        key_path: &Path,
        make: impl FnOnce() -> Result<(String, String)>,
    ) -> Result<()> {
        let (want_cert, want_key) = (self.wanted(cert_path), self.wanted(key_path));
        if !want_cert && !want_key {
            return Ok(());
        }
        if want_cert != want_key {
            bail!(
                "{} exists but {} does not: remove the other one too, or run with --force",
                if want_cert { key_path } else { cert_path }.display(),
                if want_cert { cert_path } else { key_path }.display()
            );
        }
        let (cert, key) = make()?;
        self.write(cert_path, &cert, false)?;
        self.write(key_path, &key, true)
    }
}

/// The CA at `ca_path` (its key beside it), or a new one.
fn ca(out: &mut Writer, pair: &PairFile, ca_path: &Path) -> Result<Issuer<'static, KeyPair>> {
    let key_path = ca_path.with_extension("key");
    if !out.force && ca_path.exists() && key_path.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let key = KeyPair::from_pem(&read(&key_path)?)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&read(ca_path)?, key)
            .with_context(|| format!("{} is not a CA certificate", ca_path.display()))?;
        out.kept.push(ca_path.to_path_buf());
        return Ok(issuer);
    }
    if ca_path.exists() && !out.force {
        bail!(
            "{} exists without its key {}, so no certificate can be signed with it: bring the key, or run with --force to make a new CA (and replace every certificate)",
            ca_path.display(),
            key_path.display()
        );
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("tandem CA for {}", pair.pair.name),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    let cert = params.self_signed(&key)?;
    out.write(ca_path, &cert.pem(), false)?;
    out.write(&key_path, &key.serialize_pem(), true)?;
    Ok(Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: Vec<String>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)
        .with_context(|| format!("certificate names for {common_name}"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes the files; returns the lines to print.
pub fn run(pair: &PairFile, data_dir: &Path, force: bool) -> Result<Vec<String>> {
    let Some(tls) = &pair.tls else {
        bail!(
            "{}: no [tls] section, so there are no certificate paths to fill; see fixtures/pair-tls.toml",
            pair.source
        );
    };
    let mut out = Writer {
        force,
        written: Vec::new(),
        kept: Vec::new(),
    };
    let issuer = ca(&mut out, pair, &resolve(data_dir, &tls.ca))?;

    let pair_name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| pair.pair.name.clone());
    let both = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let components = pair
        .stores
        .iter()
        .map(|s| (s.name.as_str(), Some(s.listen.0)))
        .chain(
            pair.proxies
                .iter()
                .map(|p| (p.name.as_str(), Some(p.listen.0))),
        )
        .chain(pair.gateways.iter().map(|g| (g.name.as_str(), None)));
    for (name, listen) in components {
        let mut names = vec![name.to_string(), pair_name.clone(), "localhost".to_string()];
        if let Some(addr) = listen {
            names.push(addr.ip().to_string());
        }
        names.dedup();
        out.pair(
            &resolve(data_dir, &TlsSection::for_component(&tls.cert, name)),
            &resolve(data_dir, &TlsSection::for_component(&tls.key, name)),
            || leaf(&issuer, name, names, both.clone()),
        )?;
    }
    if let (Some(cert_path), Some(key_path)) = (&tls.client_cert, &tls.client_key) {
        out.pair(
            &resolve(data_dir, cert_path),
            &resolve(data_dir, key_path),
            || {
                leaf(
                    &issuer,
                    "tandem client",
                    vec!["tandem-client".to_string()],
                    vec![ExtendedKeyUsagePurpose::ClientAuth],
                )
            },
        )?;
    }
    let mut lines = vec![format!(
        "certificates naming the pair {pair_name:?} (for tests and first use; bring your own PKI in production):"
    )];
    lines.extend(
        out.written
            .iter()
            .map(|p| format!("  made {}", p.display())),
    );
    lines.extend(out.kept.iter().map(|p| format!("  kept {}", p.display())));
    Ok(lines)
}
