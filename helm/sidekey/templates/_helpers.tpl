{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "sidekey.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, or fullnameOverride. */}}
{{- define "sidekey.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sidekey.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidekey.labels" -}}
helm.sh/chart: {{ include "sidekey.chart" . }}
{{ include "sidekey.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sidekey.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidekey.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sidekey.image" -}}
{{- printf "%s:%s" .Values.sidekey.image.repository (default .Chart.AppVersion .Values.sidekey.image.tag) }}
{{- end }}

{{- define "sidekey.policyConfigMap" -}}
{{- printf "%s-policy" (include "sidekey.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Paths, in one place. */}}
{{- define "sidekey.caDir" -}}/etc/sidekey/ca{{- end }}
{{- define "sidekey.caSecretDir" -}}/var/run/sidekey/ca-secret{{- end }}
{{- define "sidekey.providerDir" -}}/var/run/secrets/sidekey{{- end }}
{{- define "sidekey.appCaDir" -}}/etc/sidekey-ca{{- end }}
{{- define "sidekey.appBundleDir" -}}/etc/sidekey-bundle{{- end }}

{{/*
TCP connect to sidekey's loopback listener, run inside the container.
kubelet's tcpSocket/httpGet probes dial the pod IP, which a listener bound to
127.0.0.1 never answers; an exec probe runs in the pod's network namespace.
*/}}
{{- define "sidekey.connectCheck" -}}
- python3
- -c
- import socket; socket.create_connection(("127.0.0.1", {{ int .Values.sidekey.port }}), 2).close()
{{- end }}

{{- define "sidekey.probes" -}}
{{- $p := .Values.sidekey.probes -}}
startupProbe:
  exec:
    command:
      {{- include "sidekey.connectCheck" . | nindent 6 }}
  {{- toYaml $p.startup | nindent 2 }}
readinessProbe:
  exec:
    command:
      {{- include "sidekey.connectCheck" . | nindent 6 }}
  {{- toYaml $p.readiness | nindent 2 }}
livenessProbe:
  exec:
    command:
      {{- include "sidekey.connectCheck" . | nindent 6 }}
  {{- toYaml $p.liveness | nindent 2 }}
{{- /*
A later sidekey version serves GET /healthz (liveness) and /readyz (readiness)
on its admin listener, 127.0.0.1:9090. It is loopback-only too, so probe it
with exec as well (an httpGet probe would need the admin listener on the pod
IP, which sidekey allows only with SIDEKEY_ADMIN_TOKEN). When available:

readinessProbe:
  exec:
    command:
      - python3
      - -c
      - import urllib.request as u; u.urlopen("http://127.0.0.1:9090/readyz", timeout=2)
livenessProbe:
  exec:
    command:
      - python3
      - -c
      - import urllib.request as u; u.urlopen("http://127.0.0.1:9090/healthz", timeout=2)
*/}}
{{- end }}

{{/* The sidekey container: a regular container, or a native sidecar. */}}
{{- define "sidekey.sidecar" -}}
{{- $sk := .Values.sidekey -}}
- name: sidekey
  image: {{ include "sidekey.image" . | quote }}
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
    - --certs
    - {{ include "sidekey.caDir" . }}
    - --grace
    - {{ $sk.grace | toString | quote }}
    {{- range $sk.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: SIDEKEY_LOG_LEVEL
      value: {{ $sk.logLevel | quote }}
    {{- with $sk.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if and .Values.providerSecrets.existingSecret .Values.providerSecrets.asEnv }}
  envFrom:
    - secretRef:
        name: {{ .Values.providerSecrets.existingSecret }}
  {{- end }}
  {{- include "sidekey.probes" . | nindent 2 }}
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
    - name: policy
      mountPath: /etc/sidekey
      readOnly: true
    - name: ca
      mountPath: {{ include "sidekey.caDir" . }}
      readOnly: true
    {{- if and .Values.providerSecrets.existingSecret (not .Values.providerSecrets.asEnv) }}
    - name: provider-secrets
      mountPath: {{ include "sidekey.providerDir" . }}
      readOnly: true
    {{- end }}
    - name: sidekey-tmp
      mountPath: /tmp
{{- end }}
