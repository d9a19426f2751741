{{/*
sidekey.sidecar: the sidekey sidecar as pod-spec parts, a YAML map

  initContainers:  put first in the pod's initContainers (sidekey-init, and
                   sidekey itself in native-sidecar mode)
  containers:      put first in the pod's containers (sidekey, regular mode)
  volumes:         add to the pod's volumes
  appEnv:          put first in every app container's env
  appVolumeMounts: add to every app container's volumeMounts

It is the transcription of proxy/sidecar.py, which `sidekey inject` applies;
tests/k8s/test_sidecar_parity.py renders both and requires them equal.
Change both together.

Argument: a context whose .Values has this chart's shape (sidekey, ca,
providerSecrets, adminToken). In this chart: `.`. From a chart that depends on this one
(alias sidekey): (dict "Values" .Values.sidekey); sidekey.policyConfigMap,
sidekey.image.tag and adminToken.existingSecret must then be set, since they default from this chart's
release name and appVersion. Use:

  {{- $sk := include "sidekey.sidecar" (dict "Values" .Values.sidekey) | fromYaml }}
  initContainers: {{- toYaml $sk.initContainers | nindent 8 }}
*/}}
{{- define "sidekey.sidecar" -}}
{{- $v := .Values -}}
{{- $sk := $v.sidekey -}}
{{- $tag := $sk.image.tag -}}
{{- if and (not $tag) .Chart }}{{ $tag = .Chart.AppVersion }}{{ end -}}
{{- $image := printf "%s:%s" $sk.image.repository (required "sidekey.image.tag is required when sidekey.sidecar is included from another chart" $tag) -}}
{{- $cm := $sk.policyConfigMap -}}
{{- if and (not $cm) .Chart }}{{ $cm = include "sidekey.policyConfigMap" . }}{{ end -}}
{{- $cm = required "sidekey.policyConfigMap is required when sidekey.sidecar is included from another chart" $cm -}}
{{- $adminSecret := $v.adminToken.existingSecret -}}
{{- if and (not $adminSecret) .Chart }}{{ $adminSecret = include "sidekey.adminTokenSecret" . }}{{ end -}}
{{- $adminSecret = required "adminToken.existingSecret is required when sidekey.sidecar is included from another chart" $adminSecret -}}
{{- $caSecret := required "ca.existingSecret: name of the Secret holding sidekey-ca.pem and sidekey-ca-key.pem (see README)" $v.ca.existingSecret -}}
{{- $providers := $v.providerSecrets.existingSecret -}}
{{- $asEnv := $v.providerSecrets.asEnv -}}
{{- $trust := ternary "/etc/sidekey-bundle/ca-bundle.pem" "/etc/sidekey-ca/sidekey-ca.pem" $v.ca.bundle -}}
{{- $proxy := printf "http://127.0.0.1:%d" (int $sk.port) -}}
{{- $noProxy := join "," (concat (list "localhost" "127.0.0.1" "::1" ".svc" ".svc.cluster.local" ".cluster.local" "$(KUBERNETES_SERVICE_HOST)") $sk.noProxy) -}}
initContainers:
  # Copies the CA from its Secret into a memory emptyDir with mode 0600 for
  # the key (sidekey refuses a group-readable key), checks that it loads, and
  # writes the app's trust bundle. sidekey itself, exec form (no shell needed);
  # --from never creates a CA in place of a missing one.
  - name: sidekey-init
    image: {{ $image | quote }}
    imagePullPolicy: {{ $sk.image.pullPolicy }}
    command: ["sidekey"]
    args:
      - ca
      - --certs
      - /etc/sidekey/ca
      - --from
      - /var/run/sidekey/ca-secret
      {{- if $v.ca.bundle }}
      - --bundle
      - /bundle/ca-bundle.pem
      {{- end }}
    resources:
      {{- toYaml $sk.initResources | nindent 6 }}
    securityContext:
      {{- toYaml $sk.securityContext | nindent 6 }}
    volumeMounts:
      - name: sidekey-ca-secret
        mountPath: /var/run/sidekey/ca-secret
        readOnly: true
      - name: sidekey-ca
        mountPath: /etc/sidekey/ca
      {{- if $v.ca.bundle }}
      - name: sidekey-bundle
        mountPath: /bundle
      {{- end }}
  {{- if $sk.nativeSidecar }}
  {{- include "sidekey.sidecarContainer" (dict "v" $v "image" $image "adminSecret" $adminSecret) | nindent 2 }}
  {{- end }}
{{- if $sk.nativeSidecar }}
containers: []
{{- else }}
containers:
  {{- include "sidekey.sidecarContainer" (dict "v" $v "image" $image "adminSecret" $adminSecret) | nindent 2 }}
{{- end }}
volumes:
  - name: sidekey-policy
    configMap:
      name: {{ $cm }}
  # The whole CA Secret (cert + key), mounted in sidekey-init only; 0444 so
  # that its uid reads it without a pod fsGroup: no other container mounts it.
  - name: sidekey-ca-secret
    secret:
      secretName: {{ $caSecret }}
      defaultMode: 0444
  # sidekey's private copy of the CA, in memory: sidekey-init and sidekey only.
  - name: sidekey-ca
    emptyDir:
      medium: Memory
      sizeLimit: 1Mi
  # The app's view of the CA Secret: the certificate, never the key.
  - name: sidekey-ca-cert
    secret:
      secretName: {{ $caSecret }}
      defaultMode: 0444
      items:
        - key: sidekey-ca.pem
          path: sidekey-ca.pem
  {{- if $v.ca.bundle }}
  - name: sidekey-bundle
    emptyDir:
      sizeLimit: 8Mi
  {{- end }}
  {{- if and $providers (not $asEnv) }}
  # Provider keys as files, sidekey only; kubelet updates them on rotation.
  - name: sidekey-provider-keys
    secret:
      secretName: {{ $providers }}
      defaultMode: 0444
  {{- end }}
  # sidekey stages minted leaf certificates here (the root fs is read-only).
  - name: sidekey-tmp
    emptyDir:
      medium: Memory
      sizeLimit: 16Mi
appEnv:
  {{- range $name := list "HTTPS_PROXY" "https_proxy" "HTTP_PROXY" "http_proxy" }}
  - name: {{ $name }}
    value: {{ $proxy | quote }}
  {{- end }}
  - name: NO_PROXY
    value: {{ $noProxy | quote }}
  - name: no_proxy
    value: {{ $noProxy | quote }}
  - name: SSL_CERT_FILE
    value: {{ $trust | quote }}
  - name: REQUESTS_CA_BUNDLE
    value: {{ $trust | quote }}
  # curl ignores SSL_CERT_FILE.
  - name: CURL_CA_BUNDLE
    value: {{ $trust | quote }}
  # Node adds these to its built-in store: the bare CA is enough.
  - name: NODE_EXTRA_CA_CERTS
    value: "/etc/sidekey-ca/sidekey-ca.pem"
appVolumeMounts:
  # The CA certificate only: this volume projects no private key.
  - name: sidekey-ca-cert
    mountPath: /etc/sidekey-ca
    readOnly: true
  {{- if $v.ca.bundle }}
  - name: sidekey-bundle
    mountPath: /etc/sidekey-bundle
    readOnly: true
  {{- end }}
{{- end }}

{{/* The sidekey container; argument: (dict "v" <values> "image" <image> "adminSecret" <Secret name>). */}}
{{- define "sidekey.sidecarContainer" -}}
{{- $v := .v -}}
{{- $sk := $v.sidekey -}}
{{- $p := $sk.probes -}}
- name: sidekey
  image: {{ .image | quote }}
  imagePullPolicy: {{ $sk.image.pullPolicy }}
  {{- if $sk.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  command: ["sidekey"]
  args:
    - run
    - --policies
    - /etc/sidekey/policies.yaml
    - --listen
    - {{ printf "127.0.0.1:%d" (int $sk.port) | quote }}
    - --admin
    - {{ printf "127.0.0.1:%d" (int $sk.adminPort) | quote }}
    - --metrics-listen
    - {{ printf "0.0.0.0:%d" (int $sk.metricsPort) | quote }}
    - --certs
    - /etc/sidekey/ca
    - --grace
    - {{ $sk.grace | toString | quote }}
    {{- range $sk.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: metrics
      containerPort: {{ int $sk.metricsPort }}
      protocol: TCP
  env:
    - name: SIDEKEY_LOG_LEVEL
      value: {{ $sk.logLevel | quote }}
    # The admin API requires it in a pod, even on loopback (the app shares loopback).
    - name: SIDEKEY_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .adminSecret }}
          key: {{ $v.adminToken.key }}
    {{- with $sk.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if and $v.providerSecrets.existingSecret $v.providerSecrets.asEnv }}
  envFrom:
    - secretRef:
        name: {{ $v.providerSecrets.existingSecret }}
  {{- end }}
  # kubelet's httpGet on the metrics listener (pod IP, no token): the admin
  # listener is on 127.0.0.1, which kubelet never reaches.
  startupProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml $p.startup | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml $p.readiness | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml $p.liveness | nindent 4 }}
  {{- if not $sk.nativeSidecar }}
  {{- if or (gt (int $sk.waitForProxySeconds) 0) (gt (int $sk.preStopSleepSeconds) 0) }}
  lifecycle:
    {{- if gt (int $sk.waitForProxySeconds) 0 }}
    # kubelet starts the next container (the app) only when this hook returns.
    postStart:
      exec:
        command:
          - python3
          - -c
          - |
            import socket, time
            deadline = time.monotonic() + {{ int $sk.waitForProxySeconds }}
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", {{ int $sk.port }}), 1).close()
                    break
                except OSError:
                    time.sleep(0.2)
    {{- end }}
    {{- if gt (int $sk.preStopSleepSeconds) 0 }}
    preStop:
      exec:
        command: ["sleep", {{ $sk.preStopSleepSeconds | toString | quote }}]
    {{- end }}
  {{- end }}
  {{- end }}
  resources:
    {{- toYaml $sk.resources | nindent 4 }}
  securityContext:
    {{- toYaml $sk.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidekey-policy
      mountPath: /etc/sidekey
      readOnly: true
    - name: sidekey-ca
      mountPath: /etc/sidekey/ca
      readOnly: true
    {{- if and $v.providerSecrets.existingSecret (not $v.providerSecrets.asEnv) }}
    - name: sidekey-provider-keys
      mountPath: /var/run/secrets/sidekey
      readOnly: true
    {{- end }}
    - name: sidekey-tmp
      mountPath: /tmp
{{- end }}
