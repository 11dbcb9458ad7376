package validate

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// forwardAuthRE matches a forward_auth directive and its block.
var forwardAuthRE = regexp.MustCompile(`(?m)^\s*forward_auth\b([^{\n]*)\{([^}]*)\}`)

// gateway: a Caddy gateway asks the collector beside it in the pod, on
// localhost, and that collector is a native sidecar (it starts before
// Caddy and stops after it).
func (c *checker) gateway() {
	for _, w := range c.s.workloads() {
		for _, ct := range w.pod.Spec.Containers {
			if len(ct.Command) == 0 || ct.Command[0] != "caddy" {
				continue
			}
			id := w.id + " container " + ct.Name
			i := slices.Index(ct.Args, "--config")
			if i < 0 || i+1 == len(ct.Args) {
				c.errorf("%s: caddy without --config", id)
				continue
			}
			data, ok := c.fileData(w, id, &ct, ct.Args[i+1])
			if !ok {
				continue
			}
			port := ""
			for _, sc := range running(&w.pod.Spec) {
				if meterdCommand(sc) == "collector" && sc.Name != ct.Name {
					_, port, _ = net.SplitHostPort(setting(sc, envValues(sc), "listen", defaultListen["collector"]))
				}
			}
			if port == "" {
				c.errorf("%s: no collector runs as a sidecar (init container with restartPolicy Always) in the pod", id)
				continue
			}
			c.caddyfile(id, string(data), port)
			if c.o.Caddy != "" {
				c.adaptCaddyfile(id, &ct, data)
			}
		}
	}
}

// caddyfile checks every forward_auth of a Caddyfile: it asks the
// collector on localhost:port at /v1/check.
func (c *checker) caddyfile(id, text, port string) {
	ms := forwardAuthRE.FindAllStringSubmatch(text, -1)
	if len(ms) == 0 {
		c.errorf("%s: the Caddyfile has no forward_auth", id)
	}
	for _, m := range ms {
		f := strings.Fields(m[1])
		if len(f) == 0 {
			c.errorf("%s: forward_auth names no upstream", id)
		}
		for _, up := range f {
			if strings.HasPrefix(up, "/") || strings.HasPrefix(up, "@") || up == "*" {
				continue // a matcher
			}
			host, p, err := net.SplitHostPort(strings.TrimPrefix(up, "http://"))
			if err != nil || !slices.Contains([]string{"127.0.0.1", "localhost", "::1"}, host) || p != port {
				c.errorf("%s: forward_auth upstream %s; want the collector sidecar on localhost:%s", id, up, port)
			}
		}
		if !regexp.MustCompile(`(?m)^\s*uri\s+/v1/check\s*$`).MatchString(m[2]) {
			c.errorf("%s: forward_auth to %s without uri /v1/check", id, strings.TrimSpace(m[1]))
		}
	}
}

// adaptCaddyfile parses the Caddyfile with caddy itself, and checks that a
// server listens on each port of the container.
func (c *checker) adaptCaddyfile(id string, ct *corev1.Container, data []byte) {
	file := c.tempFile("Caddyfile", data)
	cmd := exec.Command(c.o.Caddy, "adapt", "--adapter", "caddyfile", "--config", file)
	cmd.Env = os.Environ()
	for k, v := range envValues(ct) {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.Output()
	if err != nil {
		msg := err.Error()
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		c.errorf("%s: caddy adapt: %s", id, strings.TrimSpace(msg))
		return
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Listen []string `json:"listen"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		c.errorf("%s: caddy adapt output: %v", id, err)
		return
	}
	var listens []string
	for _, s := range cfg.Apps.HTTP.Servers {
		listens = append(listens, s.Listen...)
	}
	for _, p := range ct.Ports {
		if !slices.Contains(listens, ":"+strconv.Itoa(int(p.ContainerPort))) {
			c.errorf("%s: port %s (%d): Caddy listens on %v", id, p.Name, p.ContainerPort, listens)
		}
	}
}
