// sse_latency: time to first event and inter-event gaps of SSE streams, direct or through
// an HTTP proxy (issue #17 item 2). Stdlib only (Go >= 1.19), no module downloads.
//
//	sse_latency -mode server -listen 127.0.0.1:0 -ca-out ca.pem   # prints "listening PORT"
//	sse_latency -mode client -url https://localhost:PORT/sse?n=200&gap=10ms -cacert ca.pem \
//	    -c 64 -rounds 3 [-proxy http://127.0.0.1:PROXYPORT -proxy-ca proxy-ca.pem]
//
// The server makes a throwaway CA and a localhost leaf in memory (writing the CA to -ca-out)
// and answers GET /sse?n=N&gap=D with N `data:` events, the first at once, then one every D
// (a ticker, so its own jitter does not accumulate). The client runs -c workers, each with one
// keep-alive connection (CONNECT through -proxy), each doing -warm unmeasured streams (the
// connection, TLS and leaf set-up), then, once all are warm, -rounds measured streams (the
// workers' starts spread evenly over -stagger, so a new request meets the others mid-stream). Per
// stream it records TTFE (request written -> first event line read) and every gap between
// consecutive event lines. It prints one JSON object with p50/p99/max of both in µs.
package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	mode := flag.String("mode", "client", "server or client")
	listen := flag.String("listen", "127.0.0.1:0", "server: address")
	caOut := flag.String("ca-out", "", "server: write the CA PEM here")
	target := flag.String("url", "", "client: the /sse URL")
	proxy := flag.String("proxy", "", "client: HTTP proxy URL (none: direct)")
	cacert := flag.String("cacert", "", "client: PEM of CAs to trust (repeat with commas)")
	conc := flag.Int("c", 64, "client: concurrent streams")
	rounds := flag.Int("rounds", 3, "client: measured streams per worker, one after another")
	warm := flag.Int("warm", 1, "client: unmeasured streams per worker first (connection set-up, leaf mint)")
	hdr := flag.String("auth", "Bearer placeholder", "client: Authorization header")
	stagger := flag.Duration("stagger", 0, "client: spread the workers' first measured streams evenly over this")
	dur := flag.Duration("d", 5*time.Second, "conns: how long to run")
	resume := flag.Bool("resume", false, "conns: keep a TLS session cache per worker (tickets)")
	keep := flag.Bool("keepalive", false, "conns: reuse one connection per worker instead (the baseline)")
	hosts := flag.Int("hosts", 0, "conns: a new host name per request (hN.bench.test), N = request number")
	flag.Parse()
	if *mode == "server" {
		server(*listen, *caOut)
		return
	}
	if *mode == "conns" {
		conns(*target, *proxy, *cacert, *conc, *dur, *resume, *hosts, *keep)
		return
	}
	client(*target, *proxy, *cacert, *conc, *warm, *rounds, *hdr, *stagger)
}

func server(addr, caOut string) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sse-latency test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	leafDER, _ := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if caOut != "" {
		must(os.WriteFile(caOut, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644))
	}
	cert := tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}
	ln, err := net.Listen("tcp", addr)
	must(err)
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	mux := http.NewServeMux()
	mux.HandleFunc("/sse", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		gap, _ := time.ParseDuration(r.URL.Query().Get("gap"))
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		fl := w.(http.Flusher)
		tick := time.NewTicker(gap)
		defer tick.Stop()
		for i := 0; i < n; i++ {
			if i > 0 {
				<-tick.C
			}
			fmt.Fprintf(w, "data: {\"i\":%d,\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n", i)
			fl.Flush()
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"id":"small","object":"test","ok":true}`)
	})
	srv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	must(srv.ServeTLS(ln, "", ""))
}

type stats struct{ ttfe, gaps []time.Duration }

func client(target, proxy, cacert string, conc, warm, rounds int, auth string, stagger time.Duration) {
	pool := loadPool(cacert)
	var proxyURL *url.URL
	if proxy != "" {
		u, err := url.Parse(proxy)
		must(err)
		proxyURL = u
	}
	results := make([]stats, conc)
	errs := make([]string, conc)
	var wg sync.WaitGroup
	start := make(chan struct{})
	var ready sync.WaitGroup // every worker warmed before any measured stream starts
	ready.Add(conc)
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			tr := &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: pool}, MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1,
				DisableCompression: true,
			}
			if proxyURL != nil {
				tr.Proxy = http.ProxyURL(proxyURL)
			}
			cl := &http.Client{Transport: tr, Timeout: 5 * time.Minute}
			var discard stats
			for r := 0; r < warm; r++ {
				if err := oneStream(cl, target, auth, &discard); err != nil {
					errs[w] = err.Error()
					ready.Done()
					return
				}
			}
			ready.Done()
			<-start
			// Streams that all start at one instant measure a queue, not a stream: spread
			// them so each new request meets the others mid-stream, as in production.
			time.Sleep(stagger * time.Duration(w) / time.Duration(conc))
			for r := 0; r < rounds; r++ {
				if err := oneStream(cl, target, auth, &results[w]); err != nil {
					errs[w] = err.Error()
					return
				}
			}
		}(w)
	}
	ready.Wait()
	close(start)
	wg.Wait()
	var all stats
	failed := 0
	for w := range results {
		all.ttfe = append(all.ttfe, results[w].ttfe...)
		all.gaps = append(all.gaps, results[w].gaps...)
		if errs[w] != "" {
			failed++
			fmt.Fprintln(os.Stderr, "worker error:", errs[w])
		}
	}
	out := map[string]any{
		"streams": len(all.ttfe), "events": len(all.gaps) + len(all.ttfe), "failed_workers": failed,
		"ttfe_us": pct(all.ttfe), "gap_us": pct(all.gaps),
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}

func oneStream(cl *http.Client, target, auth string, st *stats) error {
	req, _ := http.NewRequest("GET", target, nil)
	req.Header.Set("Authorization", auth)
	req.Header.Set("Accept", "text/event-stream")
	t0 := time.Now()
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	rd := bufio.NewReader(resp.Body)
	var last time.Time
	for {
		line, err := rd.ReadString('\n')
		if err != nil {
			return fmt.Errorf("stream ended early: %v", err)
		}
		if !strings.HasPrefix(line, "data: ") {
			continue
		}
		now := time.Now()
		if strings.HasPrefix(line, "data: [DONE]") {
			// Read to the end of the body (the chunked terminator may come in a later
			// record), or Go closes the connection instead of reusing it.
			_, err := io.Copy(io.Discard, rd)
			return err
		}
		if last.IsZero() {
			st.ttfe = append(st.ttfe, now.Sub(t0))
		} else {
			st.gaps = append(st.gaps, now.Sub(last))
		}
		last = now
	}
}

func pct(d []time.Duration) map[string]float64 {
	if len(d) == 0 {
		return nil
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(p float64) float64 { return float64(d[int(p*float64(len(d)-1))].Microseconds()) }
	return map[string]float64{"p50": at(0.50), "p99": at(0.99), "max": float64(d[len(d)-1].Microseconds())}
}

// loadPool reads the comma-separated PEM files a client trusts.
func loadPool(cacert string) *x509.CertPool {
	pool := x509.NewCertPool()
	for _, f := range strings.Split(cacert, ",") {
		if f == "" {
			continue
		}
		b, err := os.ReadFile(f)
		must(err)
		pool.AppendCertsFromPEM(b)
	}
	return pool
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
