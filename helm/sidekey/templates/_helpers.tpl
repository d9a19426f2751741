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

{{- define "sidekey.policyConfigMap" -}}
{{- printf "%s-policy" (include "sidekey.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The admin token Secret: adminToken.existingSecret, or the one this chart generates. */}}
{{- define "sidekey.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "sidekey.fullname" .) | trunc 63 | trimSuffix "-") }}
{{- end }}
