//! The subject DN of a certificate as GnuTLS's `gnutls_x509_crt_get_dn` formats it.

use thiserror::Error;

/// Why a DN cannot be formatted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DnError {
    /// The certificate is not valid DER X.509.
    #[error("Cannot import certificate: {0}")]
    Certificate(String),
    /// The subject is not valid DER.
    #[error("ASN1 parser: Error in DER parsing.")]
    Der,
    /// The subject has no RDN (GnuTLS: requested data not available).
    #[error("The requested data were not available.")]
    Empty,
    /// A DirectoryString value is empty, or a value cannot be escaped (GnuTLS refuses both).
    #[error("ASN1 parser: Value is not valid.")]
    InvalidValue,
}

/// One DER element: tag byte(s), contents, and the whole encoding.
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u32,
    pub(crate) content: &'a [u8],
    whole: &'a [u8],
}

/// Reads one DER element from the front of `buf`; returns it and the rest.
pub(crate) fn read_tlv(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), DnError> {
    let first = *buf.first().ok_or(DnError::Der)?;
    let mut pos = 1;
    let mut tag = u32::from(first);
    if first & 0x1f == 0x1f {
        // High tag number: base-128 continuation bytes.
        let mut number: u32 = 0;
        loop {
            let b = *buf.get(pos).ok_or(DnError::Der)?;
            pos += 1;
            number = number
                .checked_mul(128)
                .and_then(|n| n.checked_add(u32::from(b & 0x7f)))
                .ok_or(DnError::Der)?;
            if b & 0x80 == 0 {
                break;
            }
        }
        tag = (u32::from(first) << 24) | number;
    }
    let len_byte = *buf.get(pos).ok_or(DnError::Der)?;
    pos += 1;
    let len = if len_byte < 0x80 {
        usize::from(len_byte)
    } else {
        let n = usize::from(len_byte & 0x7f);
        // 0x80 is BER's indefinite length: not DER.
        if n == 0 || n > 4 {
            return Err(DnError::Der);
        }
        let mut len = 0usize;
        for _ in 0..n {
            let b = *buf.get(pos).ok_or(DnError::Der)?;
            pos += 1;
            len = (len << 8) | usize::from(b);
        }
        len
    };
    let end = pos.checked_add(len).ok_or(DnError::Der)?;
    if end > buf.len() {
        return Err(DnError::Der);
    }
    Ok((
        Tlv {
            tag,
            content: &buf[pos..end],
            whole: &buf[..end],
        },
        &buf[end..],
    ))
}

/// The elements of a constructed value's contents.
pub(crate) fn children(mut content: &[u8]) -> Result<Vec<Tlv<'_>>, DnError> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (tlv, rest) = read_tlv(content)?;
        out.push(tlv);
        content = rest;
    }
    Ok(out)
}

/// Dotted-decimal text of an OID's contents.
pub(crate) fn oid_string(content: &[u8]) -> Result<String, DnError> {
    let mut arcs: Vec<u128> = Vec::new();
    let mut cur: u128 = 0;
    for (i, &b) in content.iter().enumerate() {
        cur = cur
            .checked_mul(128)
            .map(|c| c | u128::from(b & 0x7f))
            .ok_or(DnError::Der)?;
        if b & 0x80 == 0 {
            arcs.push(cur);
            cur = 0;
        } else if i + 1 == content.len() {
            return Err(DnError::Der);
        }
    }
    let first = *arcs.first().ok_or(DnError::Der)?;
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut s = format!("{a}.{b}");
    for arc in &arcs[1..] {
        s.push('.');
        s.push_str(&arc.to_string());
    }
    Ok(s)
}

/// How GnuTLS decodes the value of a known attribute.
#[derive(Clone, Copy)]
enum Kind {
    /// `DirectoryString` CHOICE (may not be empty).
    Directory,
    /// `pkcs-9-challengePassword` CHOICE of PrintableString / UTF8String.
    ChallengePassword,
    /// One universal string type, by tag.
    Simple(u8),
}

const PRINTABLE: u8 = 0x13;
const IA5: u8 = 0x16;
const UTF8: u8 = 0x0c;
const NUMERIC: u8 = 0x12;
const BMP: u8 = 0x1e;
const OCTET: u8 = 0x04;
const TELETEX: u8 = 0x14;
const UNIVERSAL: u8 = 0x1c;

/// GnuTLS's table of DN attributes (`_oid2str` in `lib/x509/common.c`): OID, the name it
/// prints (the OID itself where it has none), and the value's type.
fn known(oid: &str) -> Option<(Option<&'static str>, Kind)> {
    use Kind::*;
    Some(match oid {
        "1.3.6.1.5.5.7.9.2" => (Some("placeOfBirth"), Directory),
        "1.3.6.1.5.5.7.9.3" => (Some("gender"), Simple(PRINTABLE)),
        "1.3.6.1.5.5.7.9.4" => (Some("countryOfCitizenship"), Simple(PRINTABLE)),
        "1.3.6.1.5.5.7.9.5" => (Some("countryOfResidence"), Simple(PRINTABLE)),
        "2.5.4.6" => (Some("C"), Simple(PRINTABLE)),
        "2.5.4.9" => (Some("street"), Directory),
        "2.5.4.12" => (Some("title"), Directory),
        "2.5.4.10" => (Some("O"), Directory),
        "2.5.4.11" => (Some("OU"), Directory),
        "2.5.4.3" => (Some("CN"), Directory),
        "2.5.4.7" => (Some("L"), Directory),
        "2.5.4.8" => (Some("ST"), Directory),
        "2.5.4.13" => (Some("description"), Directory),
        "2.5.4.5" => (Some("serialNumber"), Simple(PRINTABLE)),
        "2.5.4.20" => (Some("telephoneNumber"), Simple(PRINTABLE)),
        "2.5.4.4" => (Some("surName"), Directory),
        "2.5.4.43" => (Some("initials"), Directory),
        "2.5.4.44" => (Some("generationQualifier"), Directory),
        "2.5.4.42" => (Some("givenName"), Directory),
        "2.5.4.65" => (Some("pseudonym"), Directory),
        "2.5.4.46" => (Some("dnQualifier"), Simple(PRINTABLE)),
        "2.5.4.17" => (Some("postalCode"), Directory),
        "2.5.4.41" => (Some("name"), Directory),
        "2.5.4.15" => (Some("businessCategory"), Directory),
        "0.9.2342.19200300.100.1.25" => (Some("DC"), Simple(IA5)),
        "0.9.2342.19200300.100.1.1" => (Some("UID"), Directory),
        "1.2.840.113556.1.4.656" => (Some("userPrincipalName"), Directory),
        "1.3.6.1.4.1.311.60.2.1.1" => (Some("jurisdictionOfIncorporationLocalityName"), Directory),
        "1.3.6.1.4.1.311.60.2.1.2" => (
            Some("jurisdictionOfIncorporationStateOrProvinceName"),
            Directory,
        ),
        "1.3.6.1.4.1.311.60.2.1.3" => (
            Some("jurisdictionOfIncorporationCountryName"),
            Simple(PRINTABLE),
        ),
        "1.2.840.113549.1.9.1" => (Some("EMAIL"), Simple(IA5)),
        "1.2.840.113549.1.9.7" => (None, ChallengePassword),
        "1.2.840.113549.1.9.20" => (None, Simple(BMP)),
        "1.2.840.113549.1.9.21" => (None, Simple(OCTET)),
        "1.2.840.113549.1.9.4" => (None, Simple(OCTET)),
        "1.3.6.1.5.5.7.8.5" => (Some("XmppAddr"), Simple(UTF8)),
        "1.2.643.100.1" => (Some("OGRN"), Simple(NUMERIC)),
        "1.2.643.100.3" => (Some("SNILS"), Simple(NUMERIC)),
        "1.2.643.100.5" => (Some("OGRNIP"), Simple(NUMERIC)),
        "1.2.643.3.131.1.1" => (Some("INN"), Simple(NUMERIC)),
        _ => return None,
    })
}

/// `#` and lowercase hex, GnuTLS's `data2hex`.
fn hex(data: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(1 + 2 * data.len());
    out.push(b'#');
    for b in data {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    out
}

/// GnuTLS's `make_printable_string` for the types that need converting; `None` for the
/// types whose bytes are taken as they are.
fn make_printable(tag: u8, content: &[u8]) -> Option<Vec<u8>> {
    if content.is_empty() {
        return Some(Vec::new());
    }
    match tag {
        BMP => {
            if content.len() % 2 != 0 {
                return Some(hex(content));
            }
            let units = content
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            match char::decode_utf16(units).collect::<Result<String, _>>() {
                Ok(s) => Some(s.into_bytes()),
                Err(_) => Some(hex(content)),
            }
        }
        TELETEX => {
            if content.iter().all(|b| (0x20..=0x7e).contains(b)) {
                Some(content.to_vec())
            } else {
                Some(hex(content))
            }
        }
        UNIVERSAL => Some(hex(content)),
        _ => None,
    }
}

/// Decodes a value; `Ok(None)` where GnuTLS falls back to the hex of the whole value.
fn decode_value(kind: Kind, value: &[u8]) -> Result<Option<Vec<u8>>, DnError> {
    let Ok((tlv, rest)) = read_tlv(value) else {
        return Ok(None);
    };
    if !rest.is_empty() || tlv.tag > 0xff {
        return Ok(None);
    }
    let tag = tlv.tag as u8;
    let text = match kind {
        Kind::Directory | Kind::ChallengePassword => {
            let allowed: &[u8] = if matches!(kind, Kind::Directory) {
                &[TELETEX, PRINTABLE, UNIVERSAL, UTF8, BMP]
            } else {
                &[PRINTABLE, UTF8]
            };
            if !allowed.contains(&tag) {
                return Ok(None);
            }
            make_printable(tag, tlv.content).unwrap_or_else(|| tlv.content.to_vec())
        }
        Kind::Simple(expected) => {
            if tag != expected {
                return Ok(None);
            }
            make_printable(tag, tlv.content).unwrap_or_else(|| tlv.content.to_vec())
        }
    };
    // GnuTLS refuses strings with embedded NULs (and then prints the hex), except for
    // OCTET STRINGs, whose NULs make the escaping fail below.
    if text.contains(&0) && !matches!(kind, Kind::Simple(OCTET)) {
        return Ok(None);
    }
    Ok(Some(text))
}

/// RFC 4514 escaping as GnuTLS's `str_escape` does it.
fn escape(s: &[u8], out: &mut Vec<u8>) -> Result<(), DnError> {
    let last = s.len().saturating_sub(1);
    for (i, &c) in s.iter().enumerate() {
        if c == 0 {
            return Err(DnError::InvalidValue);
        }
        let special = matches!(c, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
            || (i == 0 && (c == b'#' || c == b' '))
            || (i == last && c == b' ');
        if special {
            out.push(b'\\');
        }
        out.push(c);
    }
    Ok(())
}

/// Formats a DER `Name` (SEQUENCE OF RelativeDistinguishedName) in GnuTLS's legacy
/// (`GNUTLS_X509_DN_FLAG_COMPAT`) order: RDNs in encoding order, separated by `,`;
/// the attributes of a multi-valued RDN in encoding order, separated by `+`.
pub fn format_name(name_der: &[u8]) -> Result<String, DnError> {
    let (name, rest) = read_tlv(name_der)?;
    if name.tag != 0x30 || !rest.is_empty() {
        return Err(DnError::Der);
    }
    let rdns = children(name.content)?;
    if rdns.is_empty() {
        return Err(DnError::Empty);
    }
    let mut out: Vec<u8> = Vec::new();
    for (i, rdn) in rdns.iter().enumerate() {
        if rdn.tag != 0x31 {
            return Err(DnError::Der);
        }
        if i > 0 {
            out.push(b',');
        }
        for (j, atv) in children(rdn.content)?.iter().enumerate() {
            if atv.tag != 0x30 {
                return Err(DnError::Der);
            }
            let parts = children(atv.content)?;
            let [oid, value] = parts.as_slice() else {
                return Err(DnError::Der);
            };
            if oid.tag != 0x06 {
                return Err(DnError::Der);
            }
            if j > 0 {
                out.push(b'+');
            }
            let oid = oid_string(oid.content)?;
            let entry = known(&oid);
            let label = entry.and_then(|(n, _)| n).unwrap_or(oid.as_str());
            out.extend_from_slice(label.as_bytes());
            out.push(b'=');
            let Some((_, kind)) = entry else {
                out.extend_from_slice(&hex(value.whole));
                continue;
            };
            // "DirectoryString by definition in RFC 5280 cannot be empty."
            if matches!(kind, Kind::Directory) && value.whole.get(1) == Some(&0) {
                return Err(DnError::InvalidValue);
            }
            match decode_value(kind, value.whole)? {
                Some(text) => escape(&text, &mut out)?,
                None => out.extend_from_slice(&hex(value.whole)),
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The subject DN of a DER certificate, exactly as QEMU's TLS session gets it from
/// `gnutls_x509_crt_get_dn` and hands it to `tls-authz`: most significant RDN first,
/// e.g. `C=GB,O=Example,CN=client` (the reverse of the `Subject:` line of `certtool -i`).
/// Values are escaped as RFC 4514 says (`,+"\<>;` always, `#` and space at the start,
/// space at the end); unknown attributes print as `1.2.3.4=#<hex of the DER value>`.
/// Bytes that are not UTF-8 (in a malformed UTF8String, say) become U+FFFD.
pub fn distinguished_name(cert_der: &[u8]) -> Result<String, DnError> {
    format_name(subject(cert_der)?)
}

/// The DER of a certificate's subject `Name`:
/// `Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, ... }`,
/// `TBSCertificate ::= SEQUENCE { version [0] EXPLICIT OPTIONAL, serialNumber,
/// signature, issuer, validity, subject, ... }`.
fn subject(cert_der: &[u8]) -> Result<&[u8], DnError> {
    let bad = |what: &str| DnError::Certificate(format!("malformed {what}"));
    let (cert, rest) = read_tlv(cert_der).map_err(|_| bad("certificate"))?;
    if cert.tag != 0x30 || !rest.is_empty() {
        return Err(bad("certificate"));
    }
    let (tbs, _) = read_tlv(cert.content).map_err(|_| bad("tbsCertificate"))?;
    if tbs.tag != 0x30 {
        return Err(bad("tbsCertificate"));
    }
    let mut fields = children(tbs.content).map_err(|_| bad("tbsCertificate"))?;
    if fields.first().is_some_and(|f| f.tag == 0xa0) {
        fields.remove(0);
    }
    // serialNumber, signature, issuer, validity, subject.
    match fields.get(4) {
        Some(name) if name.tag == 0x30 => Ok(name.whole),
        _ => Err(bad("subject")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::files;
    use crate::x509::tests::{
        gen_key, have_tool, make_ca, make_pki, openssl_issue, run, KeyKind, TempDir, CLIENT_DN,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::path::Path;
    use std::process::Command;

    fn pem_cert(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    /// The `Subject:` line of `certtool -i`, RDNs reversed: GnuTLS's legacy order.
    fn certtool_subject_reversed(cert: &Path) -> String {
        let out = run(Command::new("certtool").arg("-i").arg("--infile").arg(cert));
        let line = out
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("Subject: "))
            .unwrap()
            .to_string();
        // Split at commas that are not escaped.
        let mut rdns = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    let last = rdns.last_mut().unwrap();
                    last.push(c);
                    if let Some(n) = chars.next() {
                        last.push(n);
                    }
                }
                ',' => rdns.push(String::new()),
                c => rdns.last_mut().unwrap().push(c),
            }
        }
        rdns.reverse();
        rdns.join(",")
    }

    // ----- DN formatting -----

    #[test]
    fn dn_of_certtool_cert_is_what_qsd_logs() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let pki = make_pki(KeyKind::RsaPkcs1);
        let cert = pki.client_dir.join(files::CLIENT_CERT);
        let dn = distinguished_name(&pem_cert(&cert)).unwrap();
        assert_eq!(dn, CLIENT_DN);
        assert_eq!(dn, certtool_subject_reversed(&cert));
    }

    #[test]
    fn dn_matches_certtool_for_special_values() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let tmp = TempDir::new();
        let ca = make_ca(&tmp.sub("ca"), "Test CA");
        let key = tmp.path().join("k.pem");
        gen_key(&key, KeyKind::EcSec1);
        // openssl keeps the order given, multi-valued RDNs (sorted as DER wants), escapes.
        let cases: &[(&str, &str)] = &[
            (
                "/C=GB/title=Dr/O=\u{dc}n\u{ef}code Ltd/OU=\\ lead<>;trail\\ /emailAddress=a@b.c/DC=org/DC=example/UID=u1+CN=multi/CN=#hash  x",
                "C=GB,title=Dr,O=\u{dc}n\u{ef}code Ltd,OU=\\ lead\\<\\>\\;trail\\ ,EMAIL=a@b.c,DC=org,DC=example,CN=multi+UID=u1,CN=\\#hash  x",
            ),
            (
                "/serialNumber=42/street=1 Main St/postalCode=E1/GN=Ann/SN=Lee/CN=a\\,b\\+c\"d\\\\e",
                "serialNumber=42,street=1 Main St,postalCode=E1,givenName=Ann,surName=Lee,CN=a\\,b\\+c\\\"d\\\\e",
            ),
            ("/CN= ", "CN=\\ "),
        ];
        for (i, (subj, want)) in cases.iter().enumerate() {
            let cert = tmp.path().join(format!("c{i}.pem"));
            openssl_issue(&ca, &key, subj, true, &cert);
            let dn = distinguished_name(&pem_cert(&cert)).unwrap();
            assert_eq!(&dn, want, "subject {subj}");
            assert_eq!(dn, certtool_subject_reversed(&cert), "subject {subj}");
        }
    }

    #[test]
    fn dn_unknown_oid_is_dotted_with_hex_value_like_certtool() {
        if !have_tool("certtool") || !have_tool("openssl") {
            return;
        }
        let tmp = TempDir::new();
        let ca = make_ca(&tmp.sub("ca"), "Test CA");
        let key = tmp.path().join("k.pem");
        gen_key(&key, KeyKind::EcPkcs8);
        let cnf = tmp.path().join("oid.cnf");
        std::fs::write(
            &cnf,
            "oid_section = new_oids\n[new_oids]\nmyAttr = 1.3.6.1.4.1.99999.1\n[req]\ndistinguished_name = dn\n[dn]\n",
        )
        .unwrap();
        let csr = tmp.path().join("c.csr");
        let cert = tmp.path().join("c.pem");
        run(Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&cnf)
            .arg("-key")
            .arg(&key)
            .args(["-subj", "/myAttr=abc/CN=x", "-out"])
            .arg(&csr));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "3", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.cert)
            .arg("-CAkey")
            .arg(&ca.key)
            .args(["-set_serial", "9", "-out"])
            .arg(&cert));
        let dn = distinguished_name(&pem_cert(&cert)).unwrap();
        // openssl encodes the value as UTF8String (0x0c), 3 bytes.
        assert_eq!(dn, "1.3.6.1.4.1.99999.1=#0c03616263,CN=x");
        assert_eq!(dn, certtool_subject_reversed(&cert));
    }

    /// DER of a Name from RDNs of (OID contents, value TLV).
    fn name(rdns: &[&[(&[u8], &[u8])]]) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.push(0x82);
                v.extend_from_slice(&(content.len() as u16).to_be_bytes());
            }
            v.extend_from_slice(content);
            v
        }
        let mut seq = Vec::new();
        for rdn in rdns {
            let mut set = Vec::new();
            for (oid, value) in rdn.iter() {
                let mut atv = tlv(0x06, oid);
                atv.extend_from_slice(value);
                set.extend(tlv(0x30, &atv));
            }
            seq.extend(tlv(0x31, &set));
        }
        tlv(0x30, &seq)
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    const C: &[u8] = &[0x55, 0x04, 0x06]; // 2.5.4.6
    const DC: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19];

    #[test]
    fn dn_value_types_as_gnutls_decodes_them() {
        let f = |rdns: &[&[(&[u8], &[u8])]]| format_name(&name(rdns));
        // UTF8String and PrintableString as they are.
        assert_eq!(f(&[&[(CN, b"\x0c\x02hi")]]).unwrap(), "CN=hi");
        assert_eq!(f(&[&[(CN, b"\x13\x02hi")]]).unwrap(), "CN=hi");
        // BMPString converted from UTF-16BE.
        assert_eq!(
            f(&[&[(CN, b"\x1e\x04\x00h\x00\xe9")]]).unwrap(),
            "CN=h\u{e9}"
        );
        // TeletexString: ASCII kept, else hex of the contents, then escaped (`\#`).
        assert_eq!(f(&[&[(CN, b"\x14\x02ab")]]).unwrap(), "CN=ab");
        assert_eq!(f(&[&[(CN, b"\x14\x02a\xe9")]]).unwrap(), "CN=\\#61e9");
        // UniversalString: hex of the contents, escaped.
        assert_eq!(
            f(&[&[(CN, b"\x1c\x04\x00\x00\x00a")]]).unwrap(),
            "CN=\\#00000061"
        );
        // A type outside DirectoryString: hex of the whole value, not escaped.
        assert_eq!(f(&[&[(CN, b"\x16\x02hi")]]).unwrap(), "CN=#16026869");
        // C must be a PrintableString; a UTF8String C prints as hex.
        assert_eq!(f(&[&[(C, b"\x13\x02GB")]]).unwrap(), "C=GB");
        assert_eq!(f(&[&[(C, b"\x0c\x02GB")]]).unwrap(), "C=#0c024742");
        // DC is an IA5String.
        assert_eq!(f(&[&[(DC, b"\x16\x03org")]]).unwrap(), "DC=org");
        // Embedded NUL: hex of the whole value.
        assert_eq!(f(&[&[(CN, b"\x0c\x03a\x00b")]]).unwrap(), "CN=#0c03610062");
        // Multi-valued RDN in encoding order, RDNs in encoding order.
        assert_eq!(
            f(&[
                &[(C, b"\x13\x02GB")],
                &[(CN, b"\x0c\x01b"), (CN, b"\x0c\x01a")]
            ])
            .unwrap(),
            "C=GB,CN=b+CN=a"
        );
        // Unknown OID, with a large arc.
        assert_eq!(
            f(&[&[(&[0x2a, 0x03, 0x88, 0x37], b"\x02\x01\x05")]]).unwrap(),
            "1.2.3.1079=#020105"
        );
        // Escapes: always `,+"\<>;`, `#` and space first, space last.
        assert_eq!(
            f(&[&[(CN, b"\x0c\x09# a,b+c; ")]]).unwrap(),
            "CN=\\# a\\,b\\+c\\;\\ "
        );
        assert_eq!(f(&[&[(CN, b"\x0c\x03a#b")]]).unwrap(), "CN=a#b");
    }

    #[test]
    fn dn_refuses_what_gnutls_refuses_and_never_panics() {
        let f = |rdns: &[&[(&[u8], &[u8])]]| format_name(&name(rdns));
        assert_eq!(f(&[]), Err(DnError::Empty));
        // An empty DirectoryString.
        assert_eq!(f(&[&[(CN, b"\x0c\x00")]]), Err(DnError::InvalidValue));
        // Truncations of a valid name are errors, not panics.
        let good = name(&[&[(C, b"\x13\x02GB")], &[(CN, b"\x0c\x05hello")]]);
        for n in 0..good.len() {
            assert!(format_name(&good[..n]).is_err(), "prefix {n}");
        }
        // Trailing bytes after the name.
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(format_name(&extra), Err(DnError::Der));
        // Indefinite and oversized lengths.
        assert_eq!(format_name(&[0x30, 0x80, 0, 0]), Err(DnError::Der));
        assert_eq!(
            format_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DnError::Der)
        );
        assert!(matches!(
            distinguished_name(b"not a cert"),
            Err(DnError::Certificate(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn dn_never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = format_name(&bytes);
            let _ = distinguished_name(&bytes);
        }

        /// Escaping is lossless: undoing the escapes gives the value back.
        #[test]
        fn dn_escaping_round_trips(value in "[ -~]{1,60}") {
            let der = name(&[&[(CN, &[&[0x0c, value.len() as u8], value.as_bytes()].concat())]]);
            let dn = format_name(&der).unwrap();
            let escaped = dn.strip_prefix("CN=").unwrap();
            let mut unescaped = String::new();
            let mut chars = escaped.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    let n = chars.next().unwrap();
                    proptest::prop_assert!(",+\"\\<>;# ".contains(n), "needless escape of {n:?} in {dn}");
                    unescaped.push(n);
                } else {
                    proptest::prop_assert!(!",+\"\\<>;".contains(c), "unescaped {c:?} in {dn}");
                    unescaped.push(c);
                }
            }
            proptest::prop_assert_eq!(unescaped, value);
        }
    }
}
