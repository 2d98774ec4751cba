// Signs concurrently through Java's SunPKCS11 provider and verifies every
// signature in software (SunEC / SunRsaSign) and some through the provider.
//
//   java -cp DIR SignThreads CONFIG PIN THREADS ITERATIONS
//
// Every private key entry of the PKCS11 keystore (a private key with a
// certificate of the same CKA_ID) is used: EC keys with SHA256withECDSA, RSA
// keys with SHA256withRSA.  Prints one summary line starting with "RESULT" and
// exits 0 only when every signature verified.
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.Security;
import java.security.Signature;
import java.security.cert.Certificate;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicInteger;

public class SignThreads {
    static final class Entry {
        final String alias, alg;
        final PrivateKey key;
        final PublicKey pub;
        Entry(String alias, String alg, PrivateKey key, PublicKey pub) {
            this.alias = alias; this.alg = alg; this.key = key; this.pub = pub;
        }
    }

    public static void main(String[] args) throws Exception {
        String cfg = args[0];
        char[] pin = args[1].toCharArray();
        int threads = Integer.parseInt(args[2]);
        int iterations = Integer.parseInt(args[3]);

        Provider p11 = Security.getProvider("SunPKCS11").configure(cfg);
        KeyStore ks = KeyStore.getInstance("PKCS11", p11);
        ks.load(null, pin);

        List<Entry> entries = new ArrayList<>();
        for (String alias : Collections.list(ks.aliases())) {
            if (!ks.isKeyEntry(alias)) continue;
            PrivateKey k = (PrivateKey) ks.getKey(alias, null);
            Certificate c = ks.getCertificate(alias);
            String alg = k.getAlgorithm().equals("EC") ? "SHA256withECDSA" : "SHA256withRSA";
            entries.add(new Entry(alias, alg, k, c.getPublicKey()));
        }
        entries.sort((a, b) -> a.alias.compareTo(b.alias));
        if (entries.isEmpty()) throw new IllegalStateException("no private key entries");

        AtomicInteger signed = new AtomicInteger(), verified = new AtomicInteger(),
                p11verified = new AtomicInteger(), failed = new AtomicInteger();
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<?>> futures = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int tid = t;
            futures.add(pool.submit(() -> {
                for (int i = 0; i < iterations; i++) {
                    for (Entry e : entries) {
                        byte[] data = ("thread " + tid + " iteration " + i + " key " + e.alias).getBytes();
                        Signature s = Signature.getInstance(e.alg, p11);
                        s.initSign(e.key);
                        s.update(data);
                        byte[] sig = s.sign();
                        signed.incrementAndGet();
                        Signature v = Signature.getInstance(e.alg);   // software provider
                        v.initVerify(e.pub);
                        v.update(data);
                        if (v.verify(sig)) verified.incrementAndGet();
                        else { failed.incrementAndGet(); System.err.println("bad signature " + e.alias); }
                        if (i % 10 == 0) {                             // and through the token
                            Signature pv = Signature.getInstance(e.alg, p11);
                            pv.initVerify(e.pub);
                            pv.update(data);
                            if (pv.verify(sig)) p11verified.incrementAndGet();
                            else { failed.incrementAndGet(); System.err.println("p11 verify failed " + e.alias); }
                            // a wrong message must not verify
                            pv.initVerify(e.pub);
                            pv.update(new byte[] {1, 2, 3});
                            if (pv.verify(sig)) { failed.incrementAndGet(); System.err.println("forgery verified"); }
                        }
                    }
                }
                return null;
            }));
        }
        int errors = 0;
        for (Future<?> f : futures) {
            try { f.get(); } catch (Exception ex) { errors++; ex.printStackTrace(); }
        }
        pool.shutdown();
        StringBuilder keys = new StringBuilder();
        for (Entry e : entries) keys.append(keys.length() == 0 ? "" : ",").append(e.alias).append(":").append(e.alg);
        System.out.println("RESULT keys=" + keys + " signed=" + signed + " verified=" + verified
                + " p11verified=" + p11verified + " failed=" + failed + " errors=" + errors);
        System.exit(failed.get() == 0 && errors == 0 ? 0 : 1);
    }
}
